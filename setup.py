"""Packaging for lrp_scratch: metadata from settings.ini (nbdev), and the kernels/ extension.

The extension `lrp_scratch._C` is built from kernels/ when torch is importable at build time:
- C++ and CUDA sources when torch is a CUDA build and nvcc is found,
- C++ only otherwise,
- nothing (a pure-Python install; the package falls back to PyTorch code) when torch is missing.

Install with `pip install -e ".[dev]" --no-build-isolation` (or without `-e`) after torch, so the build
sees the torch you run with. Knobs (environment variables):
- LRP_SCRATCH_BUILD = auto (default) | cuda | cpu | none: which variant to build ("cuda" fails when
  it cannot be built, "auto" picks the best available).
- TORCH_CUDA_ARCH_LIST: CUDA architectures, default "7.5;8.0;8.6;8.9;9.0+PTX" (sm_75..sm_90 + PTX).
- CUDA_HOME: the CUDA toolkit root; found from `nvcc` when unset.
- LRP_SCRATCH_DEBUG=1: build with -O0 -g instead of -O3.  MAX_JOBS: parallel compile jobs (ninja).
"""
import os, re, shutil, subprocess, sys
from configparser import ConfigParser
from pathlib import Path

import setuptools

HERE = Path(__file__).resolve().parent
assert sys.version_info >= (3, 10), "lrp_scratch needs Python 3.10 or newer"

# ---------------------------------------------------------------- metadata (nbdev's settings.ini)
config = ConfigParser(delimiters=["="])
config.read(HERE / "settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]
for o in "version description keywords author author_email copyright git_url lib_name user".split():
    assert o in cfg, f"settings.ini is missing `{o}`"

licenses = {
    "apache2": ("Apache Software License 2.0", "OSI Approved :: Apache Software License"),
    "mit": ("MIT License", "OSI Approved :: MIT License"),
}
statuses = ["Planning", "Pre-Alpha", "Alpha", "Beta", "Production/Stable", "Mature", "Inactive"]
py_versions = "3.10 3.11 3.12 3.13".split()

requirements = cfg.get("requirements", "").split()
if cfg.get("pip_requirements"): requirements += cfg.get("pip_requirements", "").split()
min_python = cfg["min_python"]
lic = licenses.get(cfg["license"].lower(), (cfg["license"], None))
dev_requirements = (cfg.get("dev_requirements") or "").split()
# optional extras: every `<name>_requirements` key of settings.ini (dev_requirements -> .[dev], analysis_requirements -> .[analysis])
extras = {k[:-len("_requirements")]: v.split() for k, v in cfg.items()
          if k.endswith("_requirements") and k not in ("requirements", "pip_requirements", "conda_requirements")}


# ---------------------------------------------------------------- the extension
def say(msg):
    print(f"[lrp_scratch build] {msg}", file=sys.stderr, flush=True)


def find_cuda_home():
    "The toolkit root: $CUDA_HOME, else the TOP that `nvcc` reports (it sees through wrapper scripts)."
    if os.environ.get("CUDA_HOME"): return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None: return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
        m = re.search(r"^#\$ TOP=(.+)$", out, re.M)
        if m: return str(Path(m.group(1).strip()).resolve())  # TOP is <root>/bin/..
    except (OSError, subprocess.SubprocessError): pass
    return str(Path(nvcc).resolve().parent.parent)


def extension_modules():
    "Returns (ext_modules, cmdclass, variant)."
    mode = os.environ.get("LRP_SCRATCH_BUILD", "auto").strip().lower()
    if mode not in ("auto", "cuda", "cpu", "none"):
        sys.exit(f"LRP_SCRATCH_BUILD={mode!r} is not one of auto, cuda, cpu, none")
    if mode == "none": return [], {}, "none (LRP_SCRATCH_BUILD=none)"
    try:
        import torch
    except ImportError:
        if mode != "auto": sys.exit(f"LRP_SCRATCH_BUILD={mode} needs torch at build time: install torch first "
                                    "and build with --no-build-isolation")
        return [], {}, "none (torch is not importable at build time; install torch first and use --no-build-isolation)"

    cuda_home = find_cuda_home() if torch.version.cuda else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # torch.utils.cpp_extension reads it at import
    use_cuda = mode == "cuda" or (mode == "auto" and cuda_home is not None)
    if use_cuda and not torch.version.cuda: sys.exit("LRP_SCRATCH_BUILD=cuda needs a CUDA build of torch")
    if use_cuda and cuda_home is None: sys.exit("LRP_SCRATCH_BUILD=cuda needs nvcc (on PATH, or set CUDA_HOME)")
    if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # Without a visible GPU torch's own arch detection fails; choose a portable default.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "7.5;8.0;8.6;8.9;9.0+PTX"
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("LRP_SCRATCH_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if use_cuda else ""
    variant = "cuda" if use_cuda else "cpu"
    macros = [("LRP_SCRATCH_VARIANT", f'"{variant}"'), ("LRP_SCRATCH_CUDA_ARCHS", f'"{archs}"')]
    # (torch.utils.cpp_extension adds the C++ standard torch needs.) No code here relies on FP traps, and
    # -fno-trapping-math lets GCC vectorise the branch-free division of kernels/lrp_ops.cpp for every ISA.
    cxx = opt + ["-fno-trapping-math"]
    if sys.platform != "darwin": cxx.append("-fopenmp")  # at::parallel_for is single-threaded without it
    sources = ["kernels/lrp_ops.cpp", "kernels/lrp_filter.cpp"]
    if use_cuda:
        sources += ["kernels/lrp_ops_cuda.cu", "kernels/lrp_filter_cuda.cu"]
        macros.append(("LRP_SCRATCH_WITH_CUDA", None))
        ext = CUDAExtension("lrp_scratch._C", sources, define_macros=macros,
                            extra_compile_args={"cxx": cxx, "nvcc": opt + ["--expt-relaxed-constexpr"]},
                            extra_link_args=["-fopenmp"] if "-fopenmp" in cxx else [])
    else:
        ext = CppExtension("lrp_scratch._C", sources, define_macros=macros, extra_compile_args=cxx,
                           extra_link_args=["-fopenmp"] if "-fopenmp" in cxx else [])
    desc = f"{variant} (torch {torch.__version__}" + (f", CUDA archs {archs}, CUDA_HOME={cuda_home})" if use_cuda else ")")
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}, desc


ext_modules, cmdclass, variant = [], {}, "none"
if not any(a in sys.argv for a in ("sdist", "egg_info", "dist_info", "--name", "--version")):
    ext_modules, cmdclass, variant = extension_modules()
    say(f"lrp_scratch._C variant: {variant}")

setuptools.setup(
    name=cfg["lib_name"],
    license=lic[0],
    classifiers=[
        "Development Status :: " + statuses[int(cfg["status"])],
        "Intended Audience :: " + cfg["audience"].title(),
        "Natural Language :: " + cfg["language"].title(),
    ] + ["Programming Language :: Python :: " + o for o in py_versions[py_versions.index(min_python):]]
      + (["License :: " + lic[1]] if lic[1] else []),
    url=cfg["git_url"],
    packages=setuptools.find_packages(include=["lrp_scratch", "lrp_scratch.*"]),
    include_package_data=True,
    install_requires=requirements,
    extras_require=extras,
    python_requires=">=" + min_python,
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    zip_safe=False,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={
        "console_scripts": cfg.get("console_scripts", "").split(),
        "nbdev": [f'{cfg.get("lib_path")}={cfg.get("lib_path")}._modidx:d'],
    },
    version=cfg["version"],
    description=cfg["description"],
    keywords=cfg["keywords"],
    author=cfg["author"],
    author_email=cfg["author_email"],
)
