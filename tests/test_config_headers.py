"""The numbers the header comments of configs/*.yaml state are the estimator's (they cannot drift).

What a header may state, and how each is checked against `python -m randlift_dist.estimate`:
- an estimate block: a line `Estimate (python -m randlift_dist.estimate --config FILE [flags]
  [key=value ...]):` followed by the CLI's table, each line indented by three spaces: the
  table of the same command now, line by line: the same words, every number within 2 %;
- `N parameters`, `N-parameter` (N as 1,840,168, 119k, 0.70B; with `about` or `~`, or a k / M
  / B suffix: within 3 %, else exact): the config's expected parameter count (`estimate()`);
  `N parameters per rank` / `per GPU`: the busiest rank's, with the block's world size;
  `N parameters per lifted vertex`: the count over the lift's size (within 1 %);
  `` `key=value ...`: N parameters `` the count of the config with those overrides;
  `N parameters at seed S` (exact): the real network's `sum(p.numel())` at lift seed S;
- `~N GiB` / `about N GiB` (and GB): some byte count of the config's estimate block (within 3 %),
  or with the override form before it, that config's peak. Numbers without `~` or `about`
  (hardware: a 24 GiB machine, an 80 GB card; measurements, which say so) are not estimates.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from randlift_dist import LiftedNetwork
from randlift_dist.config import load_config
from randlift_dist.estimate import estimate
from randlift_dist.estimate.cli import format_table

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
UNITS = {"": 1, "k": 1e3, "M": 1e6, "B": 1e9}
BYTES = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "GB": 1e9}
NUM = r"(?P<approx>about |~ ?)?(?P<num>\d[\d,]*(?:\.\d+)?)(?P<unit>[kMB])?"
OVERRIDES = r"`(?P<ov>[^`]*=[^`]*)`: "
BLOCK = re.compile(r"^Estimate \(python -m randlift_dist\.estimate (?P<args>[^)]*)\):$")


def header(path: Path) -> list[str]:
    """The leading comment lines, without `#` and one space."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        out.append(line[2:] if line.startswith("# ") else line[1:])
    return out


def split_blocks(lines: list[str]) -> tuple[list[tuple[list[str], list[str]]], str]:
    """The estimate blocks `(argv, table lines)` and the prose (the other lines, joined)."""
    blocks, prose, i = [], [], 0
    while i < len(lines):
        m = BLOCK.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        table, i = [], i + 1
        while i < len(lines) and (lines[i].startswith("  ") or lines[i] == ""):
            table.append(lines[i][2:])
            i += 1
        while table and not table[-1].strip():
            table.pop()
        blocks.append((shlex.split(m["args"]), table))
    return blocks, " ".join(prose)


def _parse_args(argv: list[str]) -> tuple[str, dict, list[str]]:
    """`--config FILE --world-size P --device D --no-triton key=value ...` -> (file, kwargs, overrides)."""
    kw, overrides, it = {}, [], iter(argv)
    config = None
    for a in it:
        if a == "--config":
            config = next(it)
        elif a == "--world-size":
            kw["world_size"] = int(next(it))
        elif a == "--device":
            kw["device"] = next(it)
        elif a == "--no-triton":
            kw["triton"] = False
        else:
            assert "=" in a and not a.startswith("-"), f"unknown estimate argument {a!r} in a header"
            overrides.append(a)
    return config, kw, overrides


def _number(tok: str) -> float | None:
    try:
        return float(tok.replace(",", ""))
    except ValueError:
        return None


def _same_line(stated: str, now: str) -> bool:
    a, b = stated.split(), now.split()
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        nx, ny = _number(x), _number(y)
        if nx is None or ny is None:
            if x != y:
                return False
        elif abs(nx - ny) > max(0.02 * max(abs(nx), abs(ny)), 0.011):
            return False
    return True


def _bytes_in(table: list[str]) -> list[float]:
    """Every byte count of a table (a number followed by a unit)."""
    return [float(n.replace(",", "")) * BYTES[u] for n, u in re.findall(r"(\d[\d,]*(?:\.\d+)?) (B|KiB|MiB|GiB|TiB)\b",
                                                                        "\n".join(table))]


def _close(stated: float, approx: bool, value: float, rel: float = 0.03) -> bool:
    return abs(stated - value) <= (rel * value if approx else 0.5)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_header_numbers_match_the_estimator(path, capsys):
    blocks, prose = split_blocks(header(path))
    rel_path = str(path.relative_to(ROOT))
    cache: dict[tuple, dict] = {}

    def est(overrides: tuple = (), **kw) -> dict:
        key = (overrides, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = estimate(load_config(str(path), list(overrides)), **kw)
        return cache[key]

    block_bytes: list[float] = []
    block_kw: dict = {}
    for argv, table in blocks:
        config, kw, overrides = _parse_args(argv)
        assert config == rel_path, f"{rel_path}: its estimate block runs --config {config}"
        now = format_table(est(tuple(overrides), **kw)).splitlines()
        assert len(table) == len(now), f"{rel_path}: the estimate block has {len(table)} lines, the CLI {len(now)}"
        for stated, line in zip(table, now):
            assert _same_line(stated, line), f"{rel_path}: header says\n  {stated}\nthe estimator now\n  {line}"
        block_bytes += _bytes_in(now)
        block_kw = kw
    # prose: the override form first (then removed), then the plain statements
    for m in re.finditer(OVERRIDES + NUM + r"(?:\s+parameters\b|-parameter\b)", prose):
        n = float(m["num"].replace(",", "")) * UNITS[m["unit"] or ""]
        got = est(tuple(shlex.split(m["ov"])))["params"]
        assert _close(n, bool(m["approx"] or m["unit"]), got), f"{rel_path}: `{m['ov']}` has {got:,.0f} parameters, not {m[0]!r}"
    for m in re.finditer(OVERRIDES + NUM + r"\s*(?P<bu>GiB|GB)\b", prose):
        n = float(m["num"].replace(",", "")) * BYTES[m["bu"]]
        got = est(tuple(shlex.split(m["ov"])), **block_kw)["peak_bytes_per_rank"]
        assert _close(n, True, got), f"{rel_path}: `{m['ov']}` peaks at {got / 2**30:.2f} GiB, not {m[0]!r}"
    prose = re.sub(OVERRIDES + NUM + r"(?:\s+parameters\b|-parameter\b|\s*GiB\b|\s*GB\b)", " ", prose)
    for m in re.finditer(NUM + r"\s+parameters at seed (?P<seed>\d+)", prose):
        cfg = load_config(str(path), [f"model.lift.seed={m['seed']}"])
        base, lift = cfg.build_lift()
        got = sum(p.numel() for p in LiftedNetwork(base, lift, out_dim=cfg.out_dim(base)).parameters())
        assert _close(float(m["num"].replace(",", "")), False, got), \
            f"{rel_path}: the network at seed {m['seed']} has {got:,} parameters, not {m[0]!r}"
    prose = re.sub(NUM + r"\s+parameters at seed \d+", " ", prose)
    for m in re.finditer(NUM + r"(?:\s+parameters\b(?P<per> per (?:rank|GPU|lifted vertex))?|-parameter\b)", prose):
        n = float(m["num"].replace(",", "")) * UNITS[m["unit"] or ""]
        approx = bool(m["approx"] or m["unit"])
        if m["per"] == " per lifted vertex":
            cfg = load_config(str(path))
            base, lift = cfg.build_lift()
            got = est()["params"] / max(lift.n(v) for v in base.vertices)
            assert _close(n, True, got, 0.01), f"{rel_path}: {got:,.0f} parameters per lifted vertex, not {m[0]!r}"
        elif m["per"]:
            got = est(**block_kw)["params_per_rank"]
            assert _close(n, approx, got), f"{rel_path}: {got:,.0f} parameters per rank, not {m[0]!r}"
        else:
            got = est()["params"]
            assert _close(n, approx, got), f"{rel_path}: the estimator counts {got:,.0f} parameters, not {m[0]!r}"
    for m in re.finditer(r"(?:about |~ ?)(?P<num>\d[\d,]*(?:\.\d+)?)\s*(?P<bu>GiB|GB)\b", prose):
        n = float(m["num"].replace(",", "")) * BYTES[m["bu"]]
        assert any(_close(n, True, b) for b in block_bytes), \
            f"{rel_path}: {m[0]!r} is no byte count of its estimate block"
    capsys.readouterr()
