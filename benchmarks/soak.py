"""Fault-injection soak: many jobs over one shared cache while another process damages it.

Runs ``--jobs`` jobs of the tiny demo model (each a real ``python -m bigjob`` process, a few
in parallel, every one with part of its weights converted to an offload folder of the shared
cache) while a chaos process, every ``--pause`` seconds on average, does one of:

* delete a file of an offload folder (a shard, the marker or the index);
* flip bytes inside a shard (size kept), relabel a header's dtype (F16 -> I16), truncate a
  shard, or swap the shards of two folders;
* SIGKILL a running job;
* run ``bigjob-cache prune --max-size 1KB`` (every folder no running job uses goes).

A job that fails or is killed is run again with the same command and run folder (it resumes),
up to ``--attempts`` times. At the end: how many jobs completed, how many of them have exactly
the predictions of the same job run alone in a clean cache, how many offload folders were
rebuilt after damage, and every failure, split into one-line errors and tracebacks. Then
``bigjob-cache verify`` checks what the chaos left.

    python benchmarks/soak.py                         # 200 jobs, 2 at a time, none started after 15 min
    python benchmarks/soak.py --jobs 40 --json soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.kwargs.vocab_size=64", "model.kwargs.d_model=16", "model.kwargs.n_layers=4", "model.kwargs.n_heads=2",
        "model.kwargs.d_ff=32", "model.kwargs.max_seq_len=64", "data.num_samples=16", "data.seq_len=10",
        "data.batch_size=2", "quiet=true", "runner.isolate=false"]
VARIANTS = {  # each converts part of the model to an offload folder of its own
    "f16": ["dtype=float16", "placement.max_memory.cpu=12KiB"],
    "bf16": ["dtype=bfloat16", "placement.max_memory.cpu=12KiB"],
    "f16-16k": ["dtype=float16", "placement.max_memory.cpu=16KiB"],
}
REBUILT = "rebuilding it from the checkpoint"
# How often the chaos process picks each fault (relative weights). Pruning starts a Python
# process of its own (seconds of CPU on a small machine): rarer.
ACTIONS = {"delete": 3, "flip": 3, "relabel": 1, "truncate": 1, "swap": 1, "kill": 0.7, "prune": 0.4}


def env(cache: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    full = {**os.environ, "PYTHONPATH": path, "BIGJOB_CACHE_DIR": str(cache)}
    full.pop("HYDRA_FULL_ERROR", None)
    return full


def job_command(variant: str, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "bigjob", *TINY, *VARIANTS[variant], f"hydra.run.dir={run_dir}"]


# --------------------------------------------------------------------------- the chaos process


def offload_files(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "offload").glob("*/offload-*/*") if p.is_file())


def shards(cache: Path) -> list[Path]:
    return [p for p in offload_files(cache) if p.suffix == ".safetensors"]


def flip(path: Path, rng: random.Random) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as handle:  # in place, size kept: as bit rot would
        offset = rng.randrange(size)
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def relabel(path: Path) -> None:
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = handle.read(length)
        if b'"F16"' not in header:
            raise ValueError("no F16 tensor")
        handle.seek(8)
        handle.write(header.replace(b'"F16"', b'"I16"'))


def swap(a: Path, b: Path) -> None:
    temp = a.with_name(a.name + ".swap")
    os.rename(a, temp)
    os.rename(b, a)
    os.rename(temp, b)


def running_jobs(pids: Path, work: Path) -> list[int]:
    found = []
    for entry in pids.iterdir():
        try:
            pid = int(entry.name)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (ValueError, OSError):
            continue
        if b"bigjob" in cmdline and str(work).encode() in cmdline:  # never a recycled pid of something else
            found.append(pid)
    return found


def chaos(work: Path, seed: int, pause: float) -> None:
    """Damage the cache until ``work/stop`` exists; one JSON line per action in ``work/chaos.jsonl``."""
    rng = random.Random(seed)
    cache, pids, log = work / "cache", work / "pids", work / "chaos.jsonl"
    actions, weights = zip(*ACTIONS.items())
    while not (work / "stop").exists():
        time.sleep(rng.uniform(0.2, 1.8) * pause)
        action, detail = rng.choices(actions, weights)[0], ""
        try:
            if action == "kill":
                jobs = running_jobs(pids, work)
                if not jobs:
                    continue
                pid = rng.choice(jobs)
                os.kill(pid, signal.SIGKILL)
                detail = str(pid)
            elif action == "prune":
                done = subprocess.run([sys.executable, "-c", "import sys; from bigjob.cli import cache_main; cache_main(sys.argv[1:])",
                                       "prune", "--max-size", "1KB"], env=env(cache), capture_output=True, text=True, timeout=120)
                detail = f"rc {done.returncode}: {(done.stdout.strip().splitlines() or [''])[-1][:100]}"
            elif action == "swap":
                found = shards(cache)
                if len(found) < 2:
                    continue
                a, b = rng.sample(found, 2)
                swap(a, b)
                detail = f"{a.parent.name} <-> {b.parent.name}"
            else:
                found = offload_files(cache) if action == "delete" else shards(cache)
                if action == "relabel":
                    found = [p for p in found if b'"F16"' in p.read_bytes()[:4096]]
                if not found:
                    continue
                path = rng.choice(found)
                detail = f"{path.parent.name}/{path.name}"
                if action == "delete":
                    path.unlink()
                elif action == "flip":
                    flip(path, rng)
                elif action == "relabel":
                    relabel(path)
                else:
                    os.truncate(path, rng.randrange(path.stat().st_size))
        except (OSError, ValueError, subprocess.TimeoutExpired) as err:  # a job moved the file meanwhile
            action, detail = f"{action} (missed)", str(err)[:100]
        with open(log, "a") as handle:
            handle.write(json.dumps({"t": time.time(), "action": action, "detail": detail}) + "\n")


# --------------------------------------------------------------------------- the jobs


def classify(code: int, stderr: str) -> str:
    if code == -signal.SIGKILL:
        return "killed"
    if "Traceback" in stderr or code < 0:
        return "traceback"
    lines = stderr.strip().splitlines()
    return "one-line" if len(lines) == 1 and lines[0].startswith("error: ") else "other"


def references(work: Path) -> dict[str, bytes]:
    """Each variant's predictions, run alone in a clean cache of its own."""
    out = {}
    for variant in VARIANTS:
        run = work / "reference" / variant
        done = subprocess.run(job_command(variant, run), env=env(work / "reference-cache"), capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise SystemExit(f"the reference job {variant} failed: {done.stderr}")
        out[variant] = (run / "predictions.jsonl").read_bytes()
    return out


def soak(work: Path, jobs: int, workers: int, attempts: int, seed: int, pause: float, minutes: float) -> dict:
    reference = references(work)
    (work / "pids").mkdir()
    chaos_process = subprocess.Popen([sys.executable, __file__, "--chaos", str(work), "--seed", str(seed), "--pause", str(pause)],
                                     env=env(work / "cache"))
    queue = [(i, 1) for i in range(jobs)]
    running: dict[int, tuple[int, int, subprocess.Popen, float]] = {}
    outcomes: list[dict] = []
    final: dict[int, dict] = {}
    started = time.perf_counter()
    deadline = started + 60 * minutes
    while queue or running:
        if time.perf_counter() > deadline:  # no new job: those started finish (their retries included)
            queue = [(i, a) for i, a in queue if a > 1]
        while queue and len(running) < workers:
            index, attempt = queue.pop(0)
            variant = list(VARIANTS)[index % len(VARIANTS)]
            out = open(work / "logs" / f"{index}.{attempt}.out", "w")
            err = open(work / "logs" / f"{index}.{attempt}.err", "w")
            process = subprocess.Popen(job_command(variant, work / "runs" / str(index)), env=env(work / "cache"), stdout=out, stderr=err)
            out.close(), err.close()
            (work / "pids" / str(process.pid)).touch()
            running[process.pid] = (index, attempt, process, time.perf_counter())
        time.sleep(0.05)
        for pid, (index, attempt, process, t0) in list(running.items()):
            code = process.poll()
            if code is None:
                continue
            del running[pid]
            (work / "pids" / str(pid)).unlink(missing_ok=True)
            stdout = (work / "logs" / f"{index}.{attempt}.out").read_text(errors="replace")
            stderr = (work / "logs" / f"{index}.{attempt}.err").read_text(errors="replace")
            variant = list(VARIANTS)[index % len(VARIANTS)]
            outcome = {"job": index, "attempt": attempt, "variant": variant, "code": code, "seconds": time.perf_counter() - t0,
                       "rebuilt": sum(REBUILT in line for line in stdout.splitlines()),
                       "kind": "completed" if code == 0 else classify(code, stderr), "stderr": stderr.strip()[-2000:]}
            outcomes.append(outcome)
            if code == 0:
                predictions = (work / "runs" / str(index) / "predictions.jsonl").read_bytes()
                final[index] = {"identical": predictions == reference[variant], "attempts": attempt}
            elif attempt < attempts:
                queue.insert(0, (index, attempt + 1))
            else:
                final[index] = {"identical": False, "attempts": attempt, "gave_up": True}
    wall = time.perf_counter() - started
    (work / "stop").touch()
    chaos_process.wait(timeout=300)
    verify = subprocess.run([sys.executable, "-c", "import sys; from bigjob.cli import cache_main; cache_main(sys.argv[1:])", "verify"],
                            env=env(work / "cache"), capture_output=True, text=True, timeout=600)
    actions = [json.loads(line) for line in (work / "chaos.jsonl").read_text().splitlines()] if (work / "chaos.jsonl").exists() else []
    return {"finished": time.strftime("%Y-%m-%d %H:%M %Z"), "load_average": os.getloadavg()[0], "wall_s": wall, "started": len({o["job"] for o in outcomes}), "outcomes": outcomes, "final": final, "actions": actions,
            "verify": {"code": verify.returncode, "last": (verify.stdout.strip().splitlines() or [""])[-1],
                       "damaged": sum(line.startswith("damaged offload folder") for line in verify.stdout.splitlines())}}


def first_line(text: str) -> str:
    """The failure's kind: its first line (a traceback's last), with paths and numbers left out."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return "(no stderr)"
    line = lines[-1] if any("Traceback" in line for line in lines) else lines[0]
    line = re.sub(r"'[^']*'", "'...'", line)
    line = re.sub(r"/\S+", "...", line)
    return re.sub(r"\d+", "N", line).split(";")[0][:140]


def report(result: dict, args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _common import machine_line, versions_line

    outcomes, final, actions = result["outcomes"], result["final"], result["actions"]
    kinds = Counter(o["kind"] for o in outcomes)
    completed = [i for i, f in final.items() if not f.get("gave_up")]
    identical = sum(1 for i in completed if final[i]["identical"])
    faults = Counter(a["action"] for a in actions)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "unknown")
    print(f"# {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    finished, load = result.get("finished", time.strftime("%Y-%m-%d %H:%M %Z")), result.get("load_average", os.getloadavg()[0])
    print(f"# {finished}; {model}; {machine_line()}; load average {load:.2f} at the end")
    print(f"# {versions_line()}")
    print()
    print("| figure | value |")
    print("|---|---|")
    started = result["started"]
    print(f"| jobs | {started} of {args.jobs} asked started within --minutes {args.minutes:g} ({args.workers} at a time, "
          f"{len(outcomes)} runs in all, wall {result['wall_s']:.0f} s) |")
    print(f"| jobs completed | {len(completed)} of {started} ({started - len(completed)} gave up after {args.attempts} runs) |")
    print(f"| outputs identical to the job run alone | {identical} of {len(completed)} |")
    print(f"| offload folders rebuilt after damage (one warning each) | {sum(o['rebuilt'] for o in outcomes)} |")
    print(f"| runs killed (SIGKILL), then resumed | {kinds['killed']} |")
    print(f"| runs failed with a one-line error | {kinds['one-line']} |")
    print(f"| runs failed with a traceback | {kinds['traceback']} |")
    print(f"| runs failed otherwise (several lines, no traceback) | {kinds['other']} |")
    print(f"| faults injected | {', '.join(f'{k} {n}' for k, n in sorted(faults.items()))} |")
    print(f"| bigjob-cache verify afterwards | {result['verify']['damaged']} damaged folders found and removed: `{result['verify']['last']}` |")
    errors = Counter(first_line(o["stderr"]) for o in outcomes if o["kind"] in ("one-line", "traceback", "other"))
    if errors:
        print()
        print("| failures, by first line | runs |")
        print("|---|---|")
        for line, count in errors.most_common():
            print(f"| `{line.replace('|', '/')}` | {count} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2, help="jobs at once")
    parser.add_argument("--attempts", type=int, default=6, help="runs of one job before giving up")
    parser.add_argument("--pause", type=float, default=1.5, help="mean seconds between two faults")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=15.0, help="start no new job after this long (the table says how many ran)")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--json", help="also write every run's outcome and every fault to this file")
    parser.add_argument("--report", metavar="JSON", help="print the table of an earlier run's --json file (give its arguments too)")
    parser.add_argument("--chaos", help=argparse.SUPPRESS)  # internal: the chaos process, on this work folder
    args = parser.parse_args()
    if args.chaos:
        chaos(Path(args.chaos), args.seed, args.pause)
        return
    if args.report:
        report(json.loads(Path(args.report).read_text()), args)
        return
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bigjob-soak-"))
    (work / "logs").mkdir(parents=True, exist_ok=False)
    try:
        result = soak(work, args.jobs, args.workers, args.attempts, args.seed, args.pause, args.minutes)
    finally:
        (work / "stop").touch()
    report(result, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
