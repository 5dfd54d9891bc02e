"The sdist carries kernels/, and installing it (not editable) into a fresh venv that has torch builds and uses _C."
import os, subprocess, sys, sysconfig, tarfile, venv
from pathlib import Path

from conftest import ROOT


def sh(*args, **kw):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900, **kw)
    assert p.returncode == 0, f"{' '.join(map(str, args))} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def test_sdist_builds_and_installs_with_extension(tmp_path):
    sh(sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", tmp_path / "dist", ROOT, cwd=ROOT)
    sdist = next((tmp_path / "dist").glob("lrp_scratch-*.tar.gz"))
    names = tarfile.open(sdist).getnames()
    top = names[0].split("/")[0]
    for f in ["kernels/lrp_ops.cpp", "kernels/lrp_ops_cuda.cu", "kernels/lrp_ops.h", "settings.ini", "setup.py",
              "README.md", "LICENSE", "lrp_scratch/kernels.py"]:
        assert f"{top}/{f}" in names, f"{f} is missing from the sdist"
    assert not any(n.endswith(".so") for n in names), "a compiled library leaked into the sdist"

    # A fresh venv; torch comes from this environment's site-packages through a .pth (only the path is added:
    # the .pth files there, such as this checkout's editable install, are not processed).
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    site = sh(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(site) / "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "LRP_SCRATCH_BUILD": "cpu"}
    env.pop("PYTHONPATH", None)
    sh(py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", sdist, env=env, cwd=tmp_path)
    code = ("import lrp_scratch, lrp_scratch.kernels as k, torch; "
            "assert k.HAS_C and k.kernels_active(), k.build_info(); "
            "print(lrp_scratch.__file__); print(k.build_info()['variant']); "
            "print(k.stabilized_div(torch.tensor([1.]), torch.tensor([0.]), 1e-6).item())")
    out = sh(py, "-c", code, env={**env, "LRP_SCRATCH_REQUIRE_C": "1"}, cwd=tmp_path).stdout.split()
    assert out[0].startswith(site), f"imported {out[0]}, not the installed copy in {site}"
    assert out[1] == "cpu"
    assert abs(float(out[2]) - 1e6) < 1.0


def test_pure_python_wheel_when_torch_is_missing(tmp_path):
    "setup.py without torch at build time: a wheel without the extension, and a message saying so."
    code = ("import sys, runpy; sys.modules['torch'] = None; "
            f"sys.argv = ['setup.py', '-q', 'build', '--build-base', {str(tmp_path/'build')!r}, "
            f"'bdist_wheel', '--bdist-dir', {str(tmp_path/'bdist')!r}, '--dist-dir', {str(tmp_path)!r}]; "
            "runpy.run_path('setup.py', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "LRP_SCRATCH_BUILD"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "variant: none (torch is not importable at build time" in p.stderr
    import zipfile
    names = zipfile.ZipFile(next(tmp_path.glob("lrp_scratch-*.whl"))).namelist()
    assert "lrp_scratch/kernels.py" in names
    assert not any(n.endswith((".so", ".pyd")) for n in names)
