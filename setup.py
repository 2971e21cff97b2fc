"""Build script: all metadata is in setup.cfg.

The Xen binding (``remus.xen._xenlib``, a cffi API-mode module) is built only
where the libxen-dev headers are installed; elsewhere this is a pure-Python
package and using a Xen domain says what is missing.
"""

from setuptools import setup

setup()
