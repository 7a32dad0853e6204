"""Build of mlutils._core: C11 core + CPython/NumPy binding, jansson, optional CUDA.

Environment switches:
  MLUTILS_CUDA=0|1     force CUDA off / on (default: on when nvcc is found)
  MLUTILS_WERROR=1     warnings fail the build (CI)
  MLUTILS_SANITIZE=1   build with -fsanitize=address,undefined (see `make asan`)
  MLUTILS_DEBUG=1      -O0 -g
"""
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "mlutils", "_version.py"), encoding="utf-8") as f:
        m = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
    if not m:
        raise RuntimeError("mlutils/_version.py has no __version__")
    return m.group(1)


def env_flag(name, default=None):
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    return v.lower() not in ("0", "false", "no", "off")


def jansson_flags():
    """Compile and link flags for jansson, from pkg-config (or the default paths)."""
    cflags, libs = [], ["-ljansson"]
    if shutil.which("pkg-config"):
        try:
            cflags = subprocess.check_output(["pkg-config", "--cflags", "jansson"], text=True).split()
            libs = subprocess.check_output(["pkg-config", "--libs", "jansson"], text=True).split()
        except subprocess.CalledProcessError:
            cflags, libs = None, None
    else:
        cflags = None
    include_dirs = [f[2:] for f in (cflags or []) if f.startswith("-I")] + ["/usr/include", "/usr/local/include"]
    if not any(os.path.exists(os.path.join(d, "jansson.h")) for d in include_dirs):
        sys.exit("error: jansson headers not found: install the jansson development package "
                 "(Debian/Ubuntu: apt-get install libjansson-dev pkg-config; Fedora: jansson-devel; macOS: brew install jansson)")
    return cflags or [], libs or ["-ljansson"]


def check_zlib():
    """zlib (CRC-32 and inflate for .pt archives) is linked from the system."""
    dirs = ["/usr/include", "/usr/local/include"]
    if shutil.which("pkg-config"):
        try:
            out = subprocess.check_output(["pkg-config", "--cflags", "zlib"], text=True, stderr=subprocess.DEVNULL)
            dirs += [f[2:] for f in out.split() if f.startswith("-I")]
        except subprocess.CalledProcessError:
            pass
    if not any(os.path.exists(os.path.join(d, "zlib.h")) for d in dirs):
        sys.exit("error: zlib headers not found: install the zlib development package "
                 "(Debian/Ubuntu: apt-get install zlib1g-dev; Fedora: zlib-devel)")


def find_nvcc():
    cands = []
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(os.path.join(home, "bin", "nvcc"))
    cands.append(shutil.which("nvcc"))
    for c in cands:
        if c and os.path.exists(c):
            return os.path.realpath(c)
    return None


CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


class BuildExt(build_ext):
    """Compiles csrc/cuda/*.cu with nvcc first, then the C extension."""

    def config_stamp_path(self, ext):
        """Where the build configuration of `ext`'s output file is recorded.

        One file per output path (in place or build/lib..., whatever the
        --build-temp), kept under the build base folder: never next to the
        extension, where bdist_wheel would pack it into the wheel.
        """
        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        # Stamps of older builds lay next to the extension: drop them so that
        # no wheel made from an old build/lib carries one.
        legacy = target + ".config"
        if os.path.exists(legacy):
            os.remove(legacy)
        base = self.get_finalized_command("build").build_base
        key = hashlib.sha256(target.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return os.path.join(base, "config-stamps", "%s-%s" % (ext.name, key))

    def build_extensions(self):
        ext = self.extensions[0]
        nvcc = getattr(ext, "_mlu_nvcc", None)
        # Switching CUDA or the sanitizers on or off changes the sources and
        # flags, which setuptools' timestamp check does not see: rebuild then.
        config = repr((ext._mlu_config, sorted(ext.sources)))
        stamp = self.config_stamp_path(ext)
        try:
            with open(stamp) as f:
                if f.read() != config:
                    self.force = True
        except OSError:
            self.force = True
        if nvcc:
            objects = []
            os.makedirs(self.build_temp, exist_ok=True)
            for src in sorted(glob.glob("csrc/cuda/*.cu")):
                obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
                deps = [src] + glob.glob("csrc/cuda/*.h") + glob.glob("csrc/core/*.h") + ["csrc/mlu.h"]
                if self.force or not os.path.exists(obj) or any(
                        os.path.getmtime(d) > os.path.getmtime(obj) for d in deps):
                    cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17",
                           "-Xcompiler", "-fPIC,-Wall,-Wextra", *CUDA_ARCH_FLAGS]
                    if env_flag("MLUTILS_WERROR", False):
                        cmd += ["-Werror", "all-warnings"]
                    print(" ".join(cmd), flush=True)
                    subprocess.check_call(cmd)
                objects.append(obj)
            ext.extra_objects = objects + ext.extra_objects
        build_ext.build_extensions(self)
        os.makedirs(os.path.dirname(stamp) or ".", exist_ok=True)
        with open(stamp, "w") as f:
            f.write(config)


def make_extension():
    cflags, libs = jansson_flags()
    check_zlib()
    sources = sorted(glob.glob("csrc/core/*.c")) + sorted(glob.glob("csrc/py/*.c"))
    # NCCL is loaded at run time: the loader is plain C (dlfcn) in every build.
    sources.append("csrc/cuda/nccl_loader.c")
    depends = sorted(glob.glob("csrc/*.h") + glob.glob("csrc/*/*.h"))
    define_macros = [("MLU_VERSION", '"%s"' % read_version())]
    extra_compile = ["-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
                     "-UNDEBUG", "-fvisibility=hidden"] + cflags
    extra_link = list(libs) + ["-lz", "-ldl"]
    if env_flag("MLUTILS_WERROR", False):
        extra_compile.append("-Werror")
    if env_flag("MLUTILS_DEBUG", False):
        extra_compile += ["-O0", "-g"]
    else:
        extra_compile += ["-O2"]
    if env_flag("MLUTILS_SANITIZE", False):
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
               "-fno-sanitize-recover=undefined", "-g"]
        extra_compile += san
        extra_link += san

    want_cuda = env_flag("MLUTILS_CUDA", None)
    nvcc = find_nvcc() if want_cuda is not False else None
    if want_cuda and not nvcc:
        sys.exit("error: MLUTILS_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    library_dirs = []
    if nvcc:
        cuda_home = os.path.dirname(os.path.dirname(nvcc))
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            d = os.path.join(cuda_home, sub)
            if os.path.exists(os.path.join(d, "libcudart_static.a")):
                library_dirs.append(d)
                break
        else:
            sys.exit("error: nvcc found at %s but libcudart_static.a is missing" % nvcc)
        extra_link += ["-lcudart_static", "-ldl", "-lrt", "-lpthread", "-lstdc++"]
        define_macros.append(("MLU_WITH_CUDA", "1"))
        sources.append("csrc/cuda/nccl_comm.c")
    else:
        sources.append("csrc/cuda/stub.c")
    import numpy

    ext = Extension(
        "mlutils._core",
        sources=sources,
        depends=depends,
        include_dirs=[numpy.get_include(), "csrc"],
        library_dirs=library_dirs,
        define_macros=define_macros,
        extra_compile_args=extra_compile,
        extra_link_args=extra_link,
        language="c",
    )
    ext._mlu_nvcc = nvcc
    ext._mlu_config = (bool(nvcc), extra_compile, extra_link)
    return ext


setup(
    version=read_version(),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExt},
)
