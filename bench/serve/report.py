"""What `bench serve` leaves behind: a terminal table, summary.json, requests.jsonl
and PNG plots (latency CDFs, TTFT/TPOT over time, goodput against rate)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from bench.serve.metrics import RequestRecord


def table(summary: dict[str, Any]) -> str:
    s = summary
    lines = [
        f"requests {s['requests']} ({s['failed']} failed) in {s['duration_s']:.2f} s: "
        f"{s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} output tok/s, "
        f"cached prompt tokens {s['cached_tokens']}/{s['input_tokens']}",
        f"goodput {s['goodput']:.2f} req/s ({100 * s['goodput_share']:.1f}% within "
        f"TTFT <= {1e3 * s['slo']['ttft_s']:.0f} ms and TPOT <= {1e3 * s['slo']['tpot_s']:.0f} ms)",
        f"{'ms':<6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        p = s[key]
        lines.append(f"{key[:-2]:<6}" + "".join(f"{1e3 * p[q]:>10.2f}"
                                                for q in ("mean", "p50", "p90", "p99")))
    return "\n".join(lines)


def write_run(out_dir: Path, summary: dict[str, Any], records: list[RequestRecord]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    with (out_dir / "requests.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")
    plot_run(out_dir, records)


@functools.cache
def pyplot() -> Any:
    """matplotlib's pyplot, or None (said once) where matplotlib is not installed: the
    numbers are written all the same."""
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed: no PNG plots (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(out_dir: Path, records: list[RequestRecord]) -> None:
    plt = pyplot()
    if plt is None:
        return
    ok = [r for r in records if r.ok]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (name, values) in zip(axes, (
        ("TTFT", [r.ttft_s for r in ok]), ("TPOT", [r.tpot_s for r in ok if r.output_tokens > 1]),
        ("end to end", [r.e2e_s for r in ok]),
    ), strict=True):
        xs = sorted(1e3 * v for v in values)
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))])
        ax.set(title=f"{name} CDF", xlabel="ms", ylabel="share of requests")
    fig.tight_layout()
    fig.savefig(out_dir / "latency_cdf.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.scatter([r.sent_s for r in ok], [1e3 * r.ttft_s for r in ok], s=6, label="TTFT")
    ax.scatter([r.sent_s for r in ok], [1e3 * r.tpot_s for r in ok], s=6, label="TPOT")
    ax.set(xlabel="sent at (s)", ylabel="ms", yscale="log", title="latency over the run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "latency_over_time.png", dpi=100)
    plt.close(fig)


def write_sweep(out_dir: Path, points: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Goodput against rate; the highest rate whose goodput share stays >= target."""
    passing = [p["rate"] for p in points if p["goodput_share"] >= target]
    result = {"target_share": target, "points": points,
              "max_rate_meeting_target": max(passing) if passing else None}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps(result, indent=2))
    plt = pyplot()
    if plt is None:
        return result
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([p["rate"] for p in points], [p["goodput"] for p in points], marker="o",
            label="goodput")
    ax.plot([p["rate"] for p in points], [p["request_throughput"] for p in points],
            marker=".", linestyle="--", label="throughput")
    ax.set(xlabel="offered rate (req/s)", ylabel="req/s", title="goodput against rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "goodput_vs_rate.png", dpi=100)
    plt.close(fig)
    return result
