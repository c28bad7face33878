"""GPU-hours for a dataset, from a measured whole build on one GPU node (`benchmarks/build.py --keep`), and a
page that shows that build: utilization over time, compute per step, failures, the release.

    python benchmarks/cost_model.py benchmarks/results/build_h100.json --assets 87000 \
        --out benchmarks/results/cost_model_h100.json \
        --page docs/build_h100/index.html --verify docs/build_h100/verify.txt

Renders and encoders share the GPU: EEVEE draws on the graphics units while the encoders compute on the SMs,
so a build's GPU time is not the sum of its steps. While the render children keep the GPU busy (utilization
at its ceiling through the middle of the build), the renders set the pace: a step's GPU-seconds per asset are
its render-child seconds divided by the children sharing the GPU. The encoder actors' seconds per asset (their
calls' seconds divided by the actors) are reported beside them; they fit inside the render time when shorter.
Start-up (Ray, models, shader compilation) and the tail (the last assets on fewer children than slots) are
paid once per build and are reported, not scaled.
"""

import argparse
import html
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.monitor import UtilizationSampler  # noqa: E402

RENDER_STEPS = ("render_lh", "normalize", "render_input", "render_relight", "render_eval")
ENCODER_STEPS = ("voxelize", "features", "slat_lh", "slat_bc", "slat_shaded")
BUSY = 0.9
"""Mean GPU utilization over `WINDOW_S` at or above which the build counts as render-bound (the renders kept it
at 0.97-0.98)."""
WINDOW_S = 20.0


def cost_model(build: dict, assets: int) -> dict:
    ok = build["release"]["num_samples"]
    children = build["execution"]["render_slots"]
    steps = build["steps"]
    render = {s: steps[s]["compute_s"] / children / ok for s in RENDER_STEPS if s in steps}  # GPU-s: children share it
    encoder = {s: steps[s]["compute_s"] / build["execution"]["encoders_per_node"] / ok
               for s in ENCODER_STEPS if s in steps}
    gpu = build["utilization"]["gpu_series"]
    busy = [t for t, _ in gpu if (UtilizationSampler.mean(gpu, t - WINDOW_S / 2, t + WINDOW_S / 2) or 0.0) >= BUSY]
    per_asset = max(sum(render.values()), sum(encoder.values()))
    return {
        "build": {"assets_ok": ok, "render_children": children, "wall_s": build["wall_s"],
                  "gpu": build["machine"].get("gpu"), "command": build["command"]},
        "render_gpu_s_per_asset": render,
        "encoder_actor_s_per_asset": encoder,
        "gpu_s_per_asset": per_asset,
        "bound_by": "renders" if sum(render.values()) >= sum(encoder.values()) else "encoders",
        "end_to_end_s_per_asset": build["wall_s"] / ok,
        "once_per_build_s": {"start_up": build["utilization"]["gpu_first_busy_s"],
                             "render_bound_window": (busy[-1] - busy[0]) if busy else None,
                             "tail": build["wall_s"] - busy[-1] if busy else None},
        "dataset": {"assets": assets, "gpu_hours": assets * per_asset / 3600,
                    "gpu_hours_by_step": {s: assets * v / 3600 for s, v in render.items()}},
    }


def _polyline(series: list, width: float, height: float, duration: float) -> str:
    points = " ".join(f"{t / duration * width:.1f},{height - v * height:.1f}" for t, v in series)
    return points


def page(build: dict, model: dict, verify: str) -> str:
    """One static HTML page: the utilization timeline as SVG and the build's tables."""
    duration, width, height = build["wall_s"], 900.0, 220.0
    ok = model["build"]["assets_ok"]
    utilization = build["utilization"]
    rows = "".join(
        f"<tr><td>{html.escape(s)}</td><td>{v['computed'].get('ok', 0)}</td><td>{v['computed'].get('failed', 0)}</td>"
        f"<td>{v['compute_s']:.1f}</td><td>{v['compute_s'] / ok:.2f}</td></tr>"
        for s, v in build["steps"].items())
    reasons: dict[str, set] = {}
    for failure in build["failures"]:
        reasons.setdefault(failure["reason"], set()).add(failure["asset_id"])
    failures = "".join(f"<tr><td>{html.escape(r)}</td><td>{html.escape(', '.join(sorted(a)))}</td></tr>"
                       for r, a in sorted(reasons.items()))
    release, once = build["release"], model["once_per_build_s"]
    encoders = build["execution"]["encoders_per_node"]
    encoder_actors = "one encoder actor" if encoders == 1 else f"{encoders} encoder actors"
    splits = ", ".join(f"{k} {v}" for k, v in release["splits"].items())
    ticks = "".join(f'<text x="{t / duration * width:.0f}" y="{height + 16}" font-size="11">{t:.0f} s</text>'
                    for t in range(0, int(duration) + 1, 60))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Build on one {html.escape(str(model['build']['gpu']))}</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:960px}}table{{border-collapse:collapse;margin:8px 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}}pre{{background:#f4f4f4;padding:8px}}</style>
</head><body><h1>Whole build at paper sizes on one {html.escape(str(model['build']['gpu']))}</h1>
<p>{model['build']['assets_ok']} assets built ({len({f['asset_id'] for f in build['failures']})} refused with a reason),
{build['wall_s']:.0f} s wall, {model['build']['render_children']} render children (Vulkan) and {encoder_actors} sharing
the GPU. Render-bound: <b>{model['gpu_s_per_asset']:.1f} GPU-seconds per asset</b>
({model['dataset']['gpu_hours']:.0f} GPU-hours for {model['dataset']['assets']:,} assets); end to end, start-up and
tail included, {model['end_to_end_s_per_asset']:.1f} s per asset. Once per build: {once['start_up']:.0f} s of start-up
(Ray, models, shader compilation) and a {once['tail']:.0f} s tail after the render-bound window.</p>
<svg width="{width + 40}" height="{height + 30}"><g transform="translate(10,4)">
<rect width="{width}" height="{height}" fill="#fafafa" stroke="#ccc"/>
<polyline fill="none" stroke="#2a7" stroke-width="1.5" points="{_polyline(utilization['gpu_series'], width, height, duration)}"/>
<polyline fill="none" stroke="#c60" stroke-width="1" points="{_polyline(utilization['cpu_series'], width, height, duration)}"/>
{ticks}</g></svg>
<p><span style="color:#2a7">GPU utilization</span> and <span style="color:#c60">share of the 16 cores busy</span>,
sampled every second. GPU mean {utilization['gpu_busy']:.2f}; {utilization['gpu_busy_between_first_and_last']:.2f} between
the first and last busy second; CPU mean {utilization['cpu_busy']:.2f}.</p>
<h2>Steps</h2><p>Seconds of the actor calls (render children and encoder actors run concurrently), and per built
asset.</p><table><tr><th>step</th><th>ok</th><th>failed</th><th>compute s</th><th>per asset</th></tr>{rows}</table>
<h2>Refused assets</h2><table><tr><th>reason</th><th>assets</th></tr>{failures}</table>
<h2>Release <code>{html.escape(release['name'])}</code></h2><p>{release['num_samples']} samples, {release['num_rows']} rows;
splits: {html.escape(splits)}; held-out maps: {html.escape(', '.join(release['held_out_env_maps']))}.</p>
{f"<pre>{html.escape(verify)}</pre>" if verify else ""}</body></html>
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build", type=Path, help="a benchmarks/build.py --keep result")
    parser.add_argument("--assets", type=int, default=87_000)
    parser.add_argument("--verify", type=Path, help="the output of `near catalog verify --deep` on its data root")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--page", type=Path)
    args = parser.parse_args()
    build = json.loads(args.build.read_text())
    model = cost_model(build, args.assets)
    args.out.write_text(json.dumps(model, indent=1) + "\n")
    print(json.dumps({k: model[k] for k in ("gpu_s_per_asset", "bound_by", "end_to_end_s_per_asset")}),
          f"{model['dataset']['gpu_hours']:.0f} GPU-hours for {args.assets} assets")
    if args.page:
        args.page.parent.mkdir(parents=True, exist_ok=True)
        args.page.write_text(page(build, model, args.verify.read_text() if args.verify else ""))


if __name__ == "__main__":
    main()
