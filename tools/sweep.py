#!/usr/bin/env python
"""Run a grid of train.py runs from one recipe: optimizer x warmup x lr x seed (x extra axes).

    python -m tools.sweep --config configs/cpu/study.yaml --out runs/study \\
        --optims adamw am_adamw --warmup 20 0 --lrs 1e-3 1e-2 --seeds 0 1
    python -m tools.sweep --grid configs/cpu/study_grid.yaml            # the same from a grid file
    python -m tools.sweep --grid ... --dry-run                           # list the grid, run nothing
    python -m tools.sweep --grid ... --print-commands torchrun           # or deepspeed, slurm

Each grid point is one run directory `<out>/<name>`, named for what varies, e.g.
`am_adamw-nowarmup-lr1e-3-s0`. Runs go one after another (or `--jobs N` at a time) as
subprocesses `python train.py --config CFG run_dir=... overrides`, so a crash in one run does not
stop the sweep. A run with a DONE marker is skipped; an interrupted one is simply started again
(train.py resumes from its latest checkpoint). Each run's output goes to `<run>/train.log`.
Failures are listed at the end and the exit status is 1; 75 when the sweep itself was stopped
(SIGINT/SIGTERM: forwarded once to the runs, which checkpoint; run the same command to go on).

Grid file (YAML; every key optional, command-line flags override it; paths are relative to the
current directory, like train.py's run_dir):

    config: configs/cpu/study.yaml
    out: runs/study
    optims: [adamw, am_adamw]
    warmup: [20, 0]                 # schedule.warmup_steps; 0 = no warmup
    lrs: [1e-3, 1e-2]
    seeds: [0, 1]
    axes: {optim.beta_policy: [am, clip]}   # any other config key; AM-only keys skip adamw/sgd
    set: {train.threads: 1}         # fixed overrides for every run

Or, instead of optims / warmup / lrs / axes, a list of named arms, each a set of overrides run
for every seed (its own `seeds:` replaces the top-level list for that arm); runs are named
`<arm>-s<seed>`, seeds outermost:

    seeds: [0, 1, 2]
    arms:
      - {name: adamw-warmup, set: {optim.name: adamw, schedule.warmup_steps: 6}}
      - {name: am_adamw-clip-nowarmup, seeds: [0, 1], set: {optim.name: am_adamw, optim.beta_policy: clip}}
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from amllm.config import ConfigError, load_config, parse_override
from tools.runs import format_lr

ROOT = Path(__file__).resolve().parent.parent

PREEMPTED_EXIT = 75  # train.py's "stopped early, checkpoint written"
# Keys that exist only for the AM optimizers: an axis over them does not multiply adamw / sgd runs.
AM_ONLY = {"optim.per_layer", "optim.beta_policy", "optim.beta_min", "optim.restart_threshold",
           "optim.restart_low", "optim.lam"}
LAUNCHERS = ("torchrun", "deepspeed", "slurm")


class SweepError(Exception):
    """A user mistake in the grid; the message is one line."""


@dataclass
class Point:
    """One run of the grid."""

    name: str
    overrides: list[str]  # grid overrides (the --set ones come first, these win)
    total_steps: int
    run_dir: Path = field(default=Path())


# ---- the grid --------------------------------------------------------------------------------------
def _value_name(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format_lr(value) if value and abs(value) < 1e-2 else f"{value:g}"
    return str(value).replace("/", "_")


def _override(key: str, value) -> str:
    return f"{key}={json.dumps(value) if isinstance(value, bool) else value}"


def build_arm_grid(spec: dict) -> list[Point]:
    """Named arms x seeds (seeds outermost), each point validated by loading its config."""
    config, sets = spec.get("config"), list(spec.get("set") or [])
    for key in ("optims", "warmup", "lrs", "axes"):
        if spec.get(key):
            raise SweepError(f"arms and {key} do not combine: put {key} into the arms' set")
    arms, names = [], set()
    for i, arm in enumerate(spec["arms"], 1):
        if not isinstance(arm, dict) or not isinstance(arm.get("name"), str):
            raise SweepError(f"arm {i}: a mapping with a name (and set:, seeds:)")
        name = arm["name"]
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or name in names:
            raise SweepError(f"arm {i}: name {name!r} must be unique and use only letters, digits and _.+-")
        unknown = set(arm) - {"name", "set", "seeds"}
        if unknown:
            raise SweepError(f"arm {name}: unknown key(s) {', '.join(sorted(unknown))}; known: name, seeds, set")
        names.add(name)
        over = arm.get("set") or {}
        if not isinstance(over, dict):
            raise SweepError(f"arm {name}: set must map config keys to values")
        seeds = arm.get("seeds", spec.get("seeds")) or [None]
        seeds = seeds if isinstance(seeds, list) else [seeds]
        arms.append((name, [_override(k, v) for k, v in over.items()], seeds))
    all_seeds = sorted({s for _, _, seeds in arms for s in seeds if s is not None})
    order = all_seeds + ([None] if any(None in seeds for _, _, seeds in arms) else [])
    points = []
    for seed in order:  # seeds outermost: a sweep cut short has every arm of its first seeds
        for name, over, seeds in arms:
            if seed not in seeds:
                continue
            point_over = over + ([f"train.seed={int(seed)}"] if seed is not None else [])
            try:
                cfg = load_config(config, sets + point_over)
            except ConfigError as e:
                raise SweepError(f"arm {name}: {e}") from None
            points.append(Point(f"{name}-s{cfg.train.seed}", point_over, cfg.total_steps()))
    return points


def build_grid(spec: dict) -> list[Point]:
    """Every grid point, validated by loading its config (a bad key stops the sweep before any run)."""
    if spec.get("arms"):
        return build_arm_grid(spec)
    config, sets = spec.get("config"), list(spec.get("set") or [])
    optims = spec.get("optims") or [None]
    warmups = spec.get("warmup") or [None]
    lrs = spec.get("lrs") or [None]
    seeds = spec.get("seeds") or [None]
    axes = dict(spec.get("axes") or {})
    nonzero_warmups = {int(w) for w in warmups if w is not None and int(w) > 0}
    points: dict[str, Point] = {}
    # Seeds outermost: a sweep cut short has whole grids of the first seeds, not all runs of one optimizer.
    for seed, lr, *axis_values, warmup, optim in itertools.product(seeds, lrs, *axes.values(), warmups, optims):
        over = []
        if optim is not None:
            over.append(f"optim.name={optim}")
        if warmup is not None:
            over.append(f"schedule.warmup_steps={int(warmup)}")
        if lr is not None:
            over.append(f"optim.lr={lr}")
        if seed is not None:
            over.append(f"train.seed={int(seed)}")
        try:
            cfg = load_config(config, sets + over)
        except ConfigError as e:
            raise SweepError(f"grid point {' '.join(over)}: {e}") from None
        am = cfg.optim.name.startswith("am_")
        name = [cfg.optim.name]
        w = cfg.schedule.warmup_steps
        name.append(("warmup" + (str(w) if len(nonzero_warmups) > 1 else "")) if w > 0 else "nowarmup")
        if lr is not None:
            name.append(f"lr{format_lr(cfg.optim.lr)}")
        for key, value in zip(axes, axis_values):
            if key in AM_ONLY and not am:
                continue  # adamw has no β policy: one run stands for all of this axis' values
            over.append(f"{key}={json.dumps(value) if isinstance(value, bool) else value}")
            name.append(f"{key.rsplit('.', 1)[-1]}-{_value_name(value)}")
        name.append(f"s{cfg.train.seed}")
        try:
            cfg = load_config(config, sets + over)
        except ConfigError as e:
            raise SweepError(f"grid point {' '.join(over)}: {e}") from None
        key = "-".join(name)
        if key not in points:
            points[key] = Point(key, over, cfg.total_steps())
    return list(points.values())


def load_spec(args) -> dict:
    """Grid file values, then command-line flags on top."""
    spec: dict = {}
    if args.grid:
        path = Path(args.grid)
        if not path.is_file():
            raise SweepError(f"grid file {str(path)!r} not found")
        try:
            spec = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise SweepError(f"{path}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(spec, dict):
            raise SweepError(f"{path}: a grid file is a mapping (config:, out:, optims:, ...)")
        known = {"config", "out", "optims", "warmup", "lrs", "seeds", "axes", "set", "arms"}
        unknown = set(spec) - known
        if unknown:
            raise SweepError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        for key in ("optims", "warmup", "lrs", "seeds"):
            if spec.get(key) is not None and not isinstance(spec[key], list):
                spec[key] = [spec[key]]
        if spec.get("arms") is not None and not isinstance(spec["arms"], list):
            raise SweepError(f"{path}: arms must be a list of {{name:, set:, seeds:}} mappings")
        if not isinstance(spec.get("axes") or {}, dict):
            raise SweepError(f"{path}: axes must map a config key to a list of values")
        sets = spec.get("set") or {}
        if isinstance(sets, dict):
            sets = [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in sets.items()]
        spec["set"] = list(sets)
    for key in ("config", "out", "optims", "warmup", "lrs", "seeds"):
        value = getattr(args, key)
        if value is not None:
            spec[key] = value
    if args.lrs is not None:
        spec["lrs"] = [float(x) for x in args.lrs]
    for item in args.axis or []:
        key, _, values = item.partition("=")
        if not key or not values:
            raise SweepError(f"--axis {item!r} must look like section.key=v1,v2 (e.g. optim.beta_policy=am,clip)")
        spec.setdefault("axes", {})[key] = [yaml.safe_load(v) for v in values.split(",")]
    spec["set"] = list(spec.get("set") or []) + list(args.set or [])
    for item in spec["set"]:
        parse_override(item)  # a malformed one fails here with train.py's message
    if not spec.get("out"):
        raise SweepError("no output directory: give --out DIR (or out: in the grid file)")
    if spec.get("optims") is None and not spec.get("arms"):
        spec["optims"] = ["adamw", "am_adamw"]
    return spec


# ---- commands --------------------------------------------------------------------------------------
def train_args(spec: dict, point: Point) -> list[str]:
    """train.py's arguments for one grid point (without the interpreter / launcher)."""
    args = ["--config", str(spec["config"])] if spec.get("config") else []
    return args + [f"run_dir={point.run_dir}", *spec["set"], *point.overrides]


def cluster_command(launcher: str, spec: dict, point: Point, nproc: int, deepspeed_config: str) -> list[str]:
    args = train_args(spec, point)
    if launcher == "torchrun":
        return ["torchrun", "--nproc_per_node", str(nproc), "train.py", *args]
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(nproc), "train.py", *args,
                "parallel.backend=deepspeed", f"parallel.deepspeed_config={deepspeed_config}"]
    return ["sbatch", f"--job-name={point.name}", "launch/slurm.sbatch", *args]


# ---- running ----------------------------------------------------------------------------------------
def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def last_step(run_dir: Path) -> int:
    """Last training step logged in the run's metrics.jsonl (0 when none)."""
    path = run_dir / "metrics.jsonl"
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            return rec["step"]
    return 0


def final_val_loss(run_dir: Path) -> float | None:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "eval":
            return rec.get("val_loss")
    return None


def tail(path: Path, n: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class Sweep:
    def __init__(self, spec: dict, points: list[Point], jobs: int, status_every: float):
        self.spec, self.points, self.jobs = spec, points, max(1, jobs)
        self.status_every = status_every
        self.live = sys.stdout.isatty()
        self.stopping = ""
        self.running: dict[str, tuple[subprocess.Popen, Point, int, float, object]] = {}
        self.failed: list[tuple[Point, int]] = []
        self.interrupted: list[Point] = []
        self.finished = 0
        self.t0 = time.perf_counter()
        self.steps_done = 0  # steps trained by this invocation (for the ETA)

    def log(self, msg: str) -> None:
        if self.live:
            sys.stdout.write("\r\033[K")
        print(msg, flush=True)

    def _signal(self, signum, frame) -> None:
        if self.stopping:  # second signal: the user insists
            for proc, *_ in self.running.values():
                proc.kill()
            return
        self.stopping = signal.Signals(signum).name
        # The runs are in their own sessions (a terminal's Ctrl-C reaches only us), so each gets
        # exactly one signal: train.py finishes its step, checkpoints and exits 75.
        for proc, *_ in self.running.values():
            proc.send_signal(signal.SIGTERM)

    def start(self, i: int, point: Point) -> None:
        resume = last_step(point.run_dir) if point.run_dir.exists() else 0
        point.run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(ROOT / "train.py"), *train_args(self.spec, point), "log.progress=false"]
        logf = open(point.run_dir / "train.log", "a")
        logf.write(f"\n# sweep {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(cmd)}\n")
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        self.running[point.name] = (proc, point, resume, time.perf_counter(), logf)
        what = f"resuming after step {resume}" if resume else "starting"
        self.log(f"[{i}/{len(self.points)}] {point.name}: {what} ({point.total_steps} steps)")

    def reap(self, name: str, i_of: dict[str, int]) -> None:
        proc, point, resume, t_start, logf = self.running.pop(name)
        logf.close()
        rc = proc.returncode
        took = fmt_time(time.perf_counter() - t_start)
        self.steps_done += max(0, last_step(point.run_dir) - resume)
        tag = f"[{i_of[name]}/{len(self.points)}] {name}"
        if rc == 0 and (point.run_dir / "DONE").exists():
            self.finished += 1
            loss = final_val_loss(point.run_dir)
            self.log(f"{tag}: done in {took}" + (f", final val_loss {loss:.4f}" if loss is not None else ""))
        elif rc == PREEMPTED_EXIT or (self.stopping and rc in (-signal.SIGTERM, -signal.SIGINT)):
            # (a run stopped before train.py installed its handler dies of the signal: no harm done)
            self.interrupted.append(point)
            self.log(f"{tag}: stopped at step {last_step(point.run_dir)} with a checkpoint (exit 75) after {took}")
        else:
            self.failed.append((point, rc))
            self.log(f"{tag}: FAILED (exit {rc}) after {took}; log: {point.run_dir / 'train.log'}")

    def status(self, todo_steps: int) -> str:
        elapsed = time.perf_counter() - self.t0
        now = sum(max(0, last_step(p.run_dir) - r) for _, p, r, _, _ in self.running.values())
        done = self.steps_done + now
        eta = fmt_time((todo_steps - done) * elapsed / done) if done else "?"
        running = ", ".join(f"{n} {last_step(p.run_dir)}/{p.total_steps}" for n, (_, p, *_r) in self.running.items())
        return f"  running: {running} | elapsed {fmt_time(elapsed)}, ETA {eta}"

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._signal)
        i_of = {p.name: i for i, p in enumerate(self.points, 1)}
        queue = []
        for point in self.points:
            if (point.run_dir / "DONE").exists():
                self.log(f"[{i_of[point.name]}/{len(self.points)}] {point.name}: skip (DONE)")
                self.finished += 1
            else:
                queue.append(point)
        todo_steps = sum(p.total_steps - (last_step(p.run_dir) if p.run_dir.exists() else 0) for p in queue)
        last_status = time.perf_counter()
        while (queue and not self.stopping) or self.running:
            while queue and not self.stopping and len(self.running) < self.jobs:
                point = queue.pop(0)
                self.start(i_of[point.name], point)
            time.sleep(0.2)
            for name in [n for n, (proc, *_r) in self.running.items() if proc.poll() is not None]:
                self.reap(name, i_of)
            if self.running and time.perf_counter() - last_status >= self.status_every:
                last_status = time.perf_counter()
                line = self.status(todo_steps)
                if self.live:
                    sys.stdout.write("\r\033[K" + line[: os.get_terminal_size().columns - 1])
                    sys.stdout.flush()
                else:
                    print(line, flush=True)
        return self.report(queue)

    def report(self, not_started: list[Point]) -> int:
        total = len(self.points)
        self.log(f"sweep: {self.finished}/{total} done, {len(self.failed)} failed, "
                 f"{len(self.interrupted) + len(not_started)} unfinished, in {fmt_time(time.perf_counter() - self.t0)}")
        for point, rc in self.failed:
            print(f"\nFAILED {point.name} (exit {rc}); last lines of {point.run_dir / 'train.log'}:")
            print(tail(point.run_dir / "train.log"))
        if self.failed:
            return 1
        if self.stopping or self.interrupted or not_started:
            print("run the same command again to resume")
            return PREEMPTED_EXIT
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", help="YAML grid file (keys: config, out, optims, warmup, lrs, seeds, axes, set)")
    p.add_argument("--config", help="the recipe every run starts from (train.py --config)")
    p.add_argument("--out", help="parent directory of the run directories")
    p.add_argument("--optims", nargs="+", help="optim.name values (default: adamw am_adamw)")
    p.add_argument("--warmup", nargs="+", type=int, help="schedule.warmup_steps values; 0 = no warmup")
    p.add_argument("--lrs", nargs="+", help="optim.lr values (default: the recipe's)")
    p.add_argument("--seeds", nargs="+", type=int, help="train.seed values (default: the recipe's)")
    p.add_argument("--axis", action="append", metavar="KEY=V1,V2",
                   help="another axis, e.g. optim.beta_policy=am,clip or optim.per_layer=false,true")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every run (repeatable)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time on this machine (default 1)")
    p.add_argument("--dry-run", action="store_true", help="list the grid and what would happen, run nothing")
    p.add_argument("--print-commands", choices=LAUNCHERS, help="print one cluster command per run instead of running")
    p.add_argument("--nproc", type=int, default=8, help="GPUs per node for --print-commands torchrun/deepspeed")
    p.add_argument("--deepspeed-config", default="configs/deepspeed/zero2_bf16.json",
                   help="for --print-commands deepspeed")
    p.add_argument("--status-every", type=float, default=None,
                   help="seconds between progress lines (default: 2 on a terminal, 60 otherwise)")
    args = p.parse_args(argv)
    try:
        spec = load_spec(args)
        points = build_grid(spec)
    except (SweepError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(spec["out"])
    for point in points:
        point.run_dir = out / point.name

    if args.print_commands:
        for point in points:
            print(shlex.join(cluster_command(args.print_commands, spec, point, args.nproc, args.deepspeed_config)))
        return 0
    if args.dry_run:
        print(f"{len(points)} runs in {out} (recipe {spec.get('config') or 'defaults'}; "
              f"for every run: {' '.join(spec['set']) or 'nothing'}):")
        for i, point in enumerate(points, 1):
            state = ("done" if (point.run_dir / "DONE").exists() else
                     f"resume after step {last_step(point.run_dir)}" if last_step(point.run_dir) else "to run")
            print(f"  {i:3d}. {point.name:40s} {point.total_steps:6d} steps  {state:22s} {' '.join(point.overrides)}")
        return 0
    status_every = args.status_every or (2.0 if sys.stdout.isatty() else 60.0)
    return Sweep(spec, points, args.jobs, status_every).run()


if __name__ == "__main__":
    sys.exit(main())
