"""The command line's start-up and its speed on a busy machine.

    python bench/cli.py            # `--help` of the command and of each sub-command, fresh processes, median of 5
    python bench/cli.py --load     # a small `demo` idle and beside one busy process: OMP_WAIT_POLICY x threads

Default: each `python -m lrp_scratch [COMMAND] --help` (what the `lrp-scratch` console script runs) in a fresh process,
median of `--reps`, against `python -c "import torch"` timed in the same run (the cost the help no longer pays).

`--load`: `demo` with small options (`--n-train 1000 --n-test 200 --epochs 1 --n-explain 4`) on the machine as it is
and beside one busy loop (`python -c "while True: pass"`), for OMP_WAIT_POLICY unset (torch's default: the demo is run
through `lrp_scratch.cli.main` imported as a library, which leaves the variable alone) and PASSIVE (`--policies`, also
ACTIVE), with OMP_NUM_THREADS 1 and 2 (`--threads`); then the command itself (`python -m lrp_scratch demo`, which sets
PASSIVE when it is unset). Medians of `--reps` interleaved rounds and the ratio busy/idle. The load average is printed
after each round: on a shared machine other work adds its own slowdown, so compare rows of the same run.
"""
import argparse, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # fresh processes import this checkout's package
DEMO = ["demo", "--n-train", "1000", "--n-test", "200", "--epochs", "1", "--n-explain", "4", "--no-progress"]
LIBRARY = "import sys; from lrp_scratch.cli import main; sys.exit(main(sys.argv[1:]))"  # torch's own OpenMP defaults


def seconds(cmd, env=ENV, reps=1) -> float:
    "Median wall time of `cmd` in fresh processes (it must succeed)."
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        ts.append(time.perf_counter() - t)
        if p.returncode != 0: sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return statistics.median(ts)


def load() -> str: return "load average %.2f %.2f %.2f" % os.getloadavg()


def help_times(reps: int):
    from lrp_scratch.cli import make_parser
    commands = [[]] + [[c] for c in next(a for a in make_parser()._actions if a.dest == "command").choices]
    print(f"{os.cpu_count()} CPUs, {load()}; median of {reps} fresh processes")
    base = seconds([sys.executable, "-c", "import torch"], reps=reps)
    print(f"{'command':<40} {'seconds':>8} {'x import torch':>15}")
    print(f"{'python -c ' + repr('import torch') + ' (baseline)':<40} {base:8.3f} {1:15.2f}")
    for c in commands:
        t = seconds([sys.executable, "-m", "lrp_scratch", *c, "--help"], reps=reps)
        print(f"{' '.join(['lrp-scratch', *c, '--help']):<40} {t:8.3f} {t / base:15.2f}")
    print(load())


def busy_loop():
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def load_times(reps: int, policies: list[str], threads: list[int]):
    print(f"{os.cpu_count()} CPUs, {load()}; demo: {' '.join(DEMO)}; median of {reps}, the runs interleaved")
    out = Path(tempfile.mkdtemp())
    runs = [(p, t, [sys.executable, "-c", LIBRARY]) for p in policies for t in threads]
    runs += [("(command's default)", max(threads), [sys.executable, "-m", "lrp_scratch"])]
    times = {(p, t): ([], []) for p, t, _ in runs}
    for _ in range(reps):  # every configuration once per round, so slow drifts in the machine's load hit all of them
        for policy, t, cmd in runs:
            env = {**ENV, "OMP_NUM_THREADS": str(t)}
            env.pop("OMP_WAIT_POLICY", None)
            if policy != "unset" and not policy.startswith("("): env["OMP_WAIT_POLICY"] = policy
            args = [*cmd, *DEMO, "--out", str(out / "demo")]
            times[policy, t][0].append(seconds(args, env))
            hog = busy_loop()
            try: times[policy, t][1].append(seconds(args, env))
            finally: hog.kill(); hog.wait()
        print(f"  round done, {load()}", flush=True)
    print(f"{'OMP_WAIT_POLICY':<20} {'threads':>7} {'idle s':>8} {'busy s':>8} {'busy/idle':>9}")
    for (policy, t), (idle, busy) in times.items():
        i, b = statistics.median(idle), statistics.median(busy)
        print(f"{policy:<20} {t:>7} {i:8.1f} {b:8.1f} {b / i:9.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", action="store_true", help="demo idle vs beside one busy loop, per OMP_WAIT_POLICY and thread count")
    ap.add_argument("--reps", type=int, default=None, help="runs per timing (default: 5 for --help, 3 with --load)")
    ap.add_argument("--policies", nargs="+", default=["unset", "PASSIVE"], help="--load: OMP_WAIT_POLICY values (unset, ACTIVE, PASSIVE)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="--load: OMP_NUM_THREADS values")
    a = ap.parse_args()
    if a.load: load_times(a.reps or 3, a.policies, a.threads)
    else: help_times(a.reps or 5)
