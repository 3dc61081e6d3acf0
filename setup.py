"""Build the compiled primitives (ipc._prims); all metadata lives in pyproject.toml.

`pip install .` builds in the source tree; the built extension is also copied next to its source
(ipc/) so that `python launch.py ...` and `python -m pytest` run from a checkout find it too.
"""

import os
import shutil

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# ipc._prims, one concern per file (ipc/prims/prims.h says which); prims.h is what they share
PRIMS_UNITS = ["module", "clock", "mem", "preempt", "holder", "spin", "mutex", "rwlock", "rcu", "hist",
               "vtime", "trace"]


class build_ext_and_inplace(build_ext):
    def run(self):
        super().run()
        for ext in self.extensions:
            built = self.get_ext_fullpath(ext.name)
            self.inplace, was = 1, self.inplace
            try:
                dest = self.get_ext_fullpath(ext.name)
            finally:
                self.inplace = was
            if built != dest:
                # a new file, renamed over the old one: processes that have the old extension
                # mapped keep their copy (writing into it in place would crash them)
                tmp = f"{dest}.tmp{os.getpid()}"
                shutil.copyfile(built, tmp)
                os.replace(tmp, dest)


setup(
    cmdclass={"build_ext": build_ext_and_inplace},
    ext_modules=[
        Extension(
            "ipc._prims",
            sources=[f"ipc/prims/{unit}.c" for unit in PRIMS_UNITS],
            depends=["ipc/prims/prims.h"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
        )
    ],
)
