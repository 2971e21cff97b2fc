"""The backup's page store: a mapping of PFN to (type word, page) kept in one buffer."""

from __future__ import annotations

import pytest

from remus.image import Image, PageStore, Staging
from remus.stream.records import PAGE_SIZE

XTAB = 0xF << 60


def page(n: int) -> bytes:
    return bytes([n % 256]) * PAGE_SIZE


def test_store_behaves_like_the_dict_it_replaces() -> None:
    store = PageStore()
    model: dict[int, tuple[int, bytes | None]] = {}
    for pfn, word, data in [(5, 5, page(1)), (0, 0, page(2)), (70000, 70000, page(3)),
                            (9, XTAB | 9, None), (5, 5, page(4)), (9, 9, page(5))]:
        store[pfn] = (word, data)
        model[pfn] = (word, data)
    assert dict(store) == model and len(store) == len(model) == 4
    assert list(store) == sorted(model)  # ascending PFNs, as the save file wants them
    assert store.page(70000) == page(3) and store.page(1) is None and store.page(10 ** 9) is None
    del store[0]
    assert 0 not in store and len(store) == 3
    with pytest.raises(KeyError):
        store[1]
    with pytest.raises(ValueError):
        store[2] = (2, b"short")


def test_pages_without_data_read_as_zero_in_the_memory_image() -> None:
    image = Image()
    staged = Staging(max_pages=8)
    staged.add_page(1, page(7))
    staged.add_page(2, page(8))
    image.commit(1, staged)
    assert image.memory(4) == bytes(PAGE_SIZE) + page(7) + page(8) + bytes(PAGE_SIZE)
    staged = Staging(max_pages=8)
    staged.add_page(XTAB | 2, None)
    image.commit(2, staged)
    assert image.memory(3) == bytes(PAGE_SIZE) + page(7) + bytes(PAGE_SIZE)
    assert image.page(2) is None and image.page(1) == page(7)


def test_a_large_sparse_store_costs_address_space_not_memory() -> None:
    store = PageStore()
    store[(16 << 30) // PAGE_SIZE - 1] = (1, page(9))  # the last page of a 16 GiB guest
    assert len(store) == 1 and store.page((16 << 30) // PAGE_SIZE - 1) == page(9)


def test_a_checkpoint_is_committed_in_one_pass_with_the_same_result() -> None:
    one, many = PageStore(), PageStore()
    entries = {pfn: (pfn, page(pfn)) for pfn in range(0, 3000, 3)}
    entries[7] = (XTAB | 7, None)
    for pfn, entry in entries.items():
        one[pfn] = entry
    many.put_many(entries)
    many.put_many({})
    assert dict(one) == dict(many) and len(many) == len(entries)
    with pytest.raises(ValueError):
        many.put_many({1: (1, b"short")})
