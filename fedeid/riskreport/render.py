"""The report as one self-contained HTML page: inline CSS, plots as inline PNG, no external resource.

Everything shown is read from the report's JSON (:func:`render` takes nothing else), so the page
and the JSON cannot disagree, and an officer can recompute any sentence from the figures.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

FIGURE_LABELS = {"p_at_1": "P@1", "map_at_r": "mAP@R", "verification_auc": "verification AUC",
                 "tpr_at_fpr_1e-2": "TPR @ FPR 1 %", "tpr_at_fpr_1e-3": "TPR @ FPR 0.1 %"}

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;max-width:62rem;margin:2rem auto;
padding:0 1rem;color:#1d2330;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;border-bottom:2px solid #d8dde6;padding-bottom:.2rem;
margin-top:2rem}table{border-collapse:collapse;width:100%;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #d8dde6;padding:.3rem .5rem;text-align:left}th{background:#f1f4f8}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.verdict{padding:.8rem 1rem;border-left:5px solid #b7791f;background:#fdf6e9}
.verdict.low{border-color:#2f855a;background:#edf7f0}.verdict.high{border-color:#c53030;background:#fdeded}
.muted{color:#5a6475;font-size:.85rem}code{font-size:.8rem;word-break:break-all}
img{max-width:100%}.sig td{height:2.2rem}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def fmt(iv: dict[str, Any] | float | None, digits: int = 3) -> str:
    """``0.912 [0.850–0.960]`` for an interval, the bare number for a float, "—" for nothing."""
    if iv is None:
        return "—"
    if isinstance(iv, dict):
        if iv.get("value") is None:
            return "—"
        ci = f" [{iv['low']:.{digits}f}–{iv['high']:.{digits}f}]" if iv.get("low") is not None else ""
        return f"{iv['value']:.{digits}f}{ci}"
    return f"{float(iv):.{digits}f}"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _bars(ax: Any, labels: list[str], series: dict[str, list[dict[str, Any]]], ylabel: str) -> None:
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for i, (name, ivs) in enumerate(series.items()):
        v = np.array([iv["value"] if iv["value"] is not None else np.nan for iv in ivs])
        lo = np.array([iv["low"] if iv["low"] is not None else np.nan for iv in ivs])
        hi = np.array([iv["high"] if iv["high"] is not None else np.nan for iv in ivs])
        err = np.nan_to_num(np.vstack([v - lo, hi - v]), nan=0.0).clip(min=0)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, v, width, yerr=err, capsize=3, label=name)
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)


def reid_plot(r: dict[str, Any]) -> str:
    names = list(r["attackers"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, ("p_at_1", "tpr_at_fpr_1e-2")):
        _bars(ax, names, {"originals (level 0)": [r["attackers"][n]["before"][key] for n in names],
                          f"released (level {r['level']:g})": [r["attackers"][n]["after"][key] for n in names]},
              FIGURE_LABELS[key])
        ax.set_title(f"{FIGURE_LABELS[key]} per attacker (95 % CI over patients)", fontsize=10)
    axes[0].axhline(r["chance_p_at_1"], color="k", ls="--", lw=1, label="chance")
    axes[0].legend(fontsize=8)
    return _png(fig)


def utility_plot(r: dict[str, Any]) -> str:
    findings = list(r["utility"]["before"])
    fig, ax = plt.subplots(figsize=(10, 3.4))
    _bars(ax, findings, {"originals": [r["utility"]["before"][f] for f in findings],
                         "released": [r["utility"]["after"].get(f, {"value": None, "low": None, "high": None})
                                      for f in findings]}, "finding AUC")
    ax.axhline(0.5, color="k", ls="--", lw=1, label="no information")
    ax.legend(fontsize=8)
    ax.set_title("Medical content kept: finding classifier AUC (95 % CI over patients)", fontsize=10)
    return _png(fig)


def _table(head: list[str], rows: list[list[Any]], num_from: int = 1) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td class='num'>{_e(c)}</td>" if j >= num_from else f"<td>{_e(c)}</td>"
                                    for j, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _section(title: str, body: str, anchor: str) -> str:
    return f"<section id='{anchor}'><h2>{_e(title)}</h2>{body}</section>"


def render(report: dict[str, Any]) -> str:
    r = report["risk"]
    worst = r["attackers"][r["worst_attacker"]]
    verdict = report["verdict"]
    parts = [
        f"<h1>Re-identification risk report</h1><p class='muted'>{_e(report['subject'])} · issued "
        f"{_e(report['issued'])} · fedeid {_e(report['fedeid_version'])}</p>",
        f"<div class='verdict {verdict['class']}' id='verdict'><strong>{_e(verdict['headline'])}</strong>"
        f"<br>{_e(verdict['detail'])}</div>",
        _section("Threat model", "".join(f"<p>{_e(p)}</p>" for p in report["threat_model"]), "threat"),
    ]
    rows = []
    for name, a in r["attackers"].items():
        for key, label in FIGURE_LABELS.items():
            rows.append([name if key == "p_at_1" else "", label, fmt(a["before"][key]), fmt(a["after"][key])])
    parts.append(_section(
        "Re-identification risk (linkability), worst attacker first",
        f"<p>Each attacker ranks an archive of {r['data']['gallery']} original images of "
        f"{r['data']['test_patients']} held-out patients for each of {r['data']['queries']} released images. "
        f"Chance P@1 is {r['chance_p_at_1']:.3f}. Intervals: 95 % bootstrap over patients "
        f"({r['bootstrap']['samples']} resamples).</p>"
        + _table(["attacker", "figure", "originals (level 0)", f"released (level {r['level']:g})"], rows, 2)
        + f"<img alt='re-identification per attacker' src='{reid_plot(r)}'>", "reid"))
    so_rows = [[n, fmt(a["singling_out"]["before"]["singled_out"]), fmt(a["singling_out"]["after"]["singled_out"]),
                fmt(a["singling_out"]["after"]["singled_out_correctly"]), fmt(a["singling_out"]["after"]["median_ratio"])]
               for n, a in r["attackers"].items()]
    inf = r["inference"]
    inf_html = (f"<p>Not measured: {_e(inf['not_measured'])}.</p>" if "not_measured" in inf else
                _table(["attribute", "accuracy on originals", "accuracy on released images", "majority-class rate"],
                       [[inf["attribute"], fmt(inf["before"]["accuracy"]), fmt(inf["after"]["accuracy"]),
                         fmt(inf["after"]["chance"])]]))
    parts.append(_section(
        "WP29 anonymisation criteria",
        "<h3>Linkability</h3><p>The worst case of the table above: P@1 "
        f"{fmt(worst['after']['p_at_1'])} ({_e(r['worst_attacker'])}), against {fmt(worst['before']['p_at_1'])} "
        "for the originals.</p><h3>Singling out</h3><p>Share of released images whose nearest archive patient is "
        "much nearer than the second (distance ratio &lt; 0.8), and of those pointing at the right patient.</p>"
        + _table(["attacker", "singled out (originals)", "singled out (released)", "… correctly (released)",
                  "median distance ratio (released)"], so_rows)
        + "<h3>Inference</h3><p>A classifier trained on de-identified training images predicts an attribute "
        "of each released image.</p>" + inf_html, "wp29"))
    u = r["utility"]
    u_rows = [[f, fmt(u["before"][f]), fmt(u["after"].get(f))] for f in u["before"]]
    q = r["quality"]
    parts.append(_section(
        "Utility kept",
        _table(["finding", "AUC on originals", "AUC on released images"], u_rows)
        + f"<p>Image quality against the originals: SSIM {fmt(q['ssim'])}, PSNR {fmt(q['psnr_db'], 1)} dB.</p>"
        + f"<img alt='utility per finding' src='{utility_plot(r)}'>", "utility"))
    parts.append(_section("Model and training", _provenance(report["model"]), "model"))
    if report.get("dicom"):
        parts.append(_section("DICOM batch", _dicom(report["dicom"]), "dicom"))
    parts.append(_section("Audit-log entries relied on", _audit(report["audit"]), "audit"))
    parts.append(_section(
        "Conditions, residual risk and re-assessment",
        "<h3>Conditions of release</h3><ul>" + "".join(f"<li>{_e(c)}</li>" for c in report["conditions"])
        + "</ul><h3>Residual risk</h3>" + "".join(f"<p>{_e(p)}</p>" for p in report["residual_risk"])
        + f"<p><strong>Re-assess by {_e(report['reassess_by'])}</strong>, or earlier when the model, the level, "
        "the data or the attackers known change.</p>", "conditions"))
    parts.append(_section(
        "Signature",
        "<p>This report and its JSON are signed with the site key "
        f"<code>{_e(report.get('signed_by', 'unsigned'))}</code> (detached Ed25519 signature in "
        "<code>report.sig</code>; check with <code>fedeid report verify</code>).</p>"
        "<table class='sig'><tr><th>Privacy officer (name, role)</th><td></td></tr><tr><th>Date</th><td></td></tr>"
        "<tr><th>Decision</th><td>approve / approve with conditions / refuse</td></tr><tr><th>Signature</th><td></td></tr>"
        "</table>", "signature"))
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>fedeid re-identification risk report"
            f"</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")


def _provenance(m: dict[str, Any]) -> str:
    rows = [["checkpoint SHA-256", m["sha256"]], ["training", m["mode"]]]
    if m.get("reid_sha256"):
        rows.append(["site ReID checkpoint SHA-256", m["reid_sha256"]])
    if m.get("prior_sha256"):
        rows.append(["site identity prior SHA-256", m["prior_sha256"]])
    fed = m.get("federated")
    if fed:
        rows += [["rounds", fed.get("rounds")], ["sites", ", ".join(map(str, fed.get("sites", []))) or "—"],
                 ["central DP ε (δ)", fed.get("central_epsilon") or "not used"]]
        for site, eps in sorted(fed.get("local_epsilon", {}).items()):
            rows.append([f"site {site}: local DP ε", f"{eps:.3f}" if isinstance(eps, float) else eps])
        if not fed.get("local_epsilon"):
            rows.append(["local DP", "not used"])
    return _table(["", "value"], [[a, b] for a, b in rows], num_from=2)


def _dicom(d: dict[str, Any]) -> str:
    scan = d["phi_scan"]
    rows = [["mode", d["mode"]], ["level", "—" if d.get("level") is None else d["level"]], ["profile", d["profile"]],
            ["options", ", ".join(k for k, v in d["options"].items() if v is True) or "none (defaults)"],
            *[[f"files {k}", v] for k, v in d["counts"].items()],
            ["byte-level PHI scan", scan["result"]]]
    return _table(["", "value"], rows, num_from=2)


def _audit(a: dict[str, Any]) -> str:
    head = (f"<p>Audit log at issue: {a['verify']['entries']} entries, "
            f"{'intact' if a['verify']['ok'] else 'TAMPERED: ' + '; '.join(a['verify']['problems'][:3])}; "
            f"{a['verify']['checkpoints']} signed checkpoint(s).</p>")
    cp = a.get("checkpoint")
    if cp:
        head += f"<p>Latest checkpoint: {cp['size']} entries, root <code>{_e(cp['root'])}</code>.</p>"
    rows = [[e["seq"], e["kind"], e["time"], e["hash"], "yes" if e.get("inclusion_proof") else "not yet checkpointed"]
            for e in a["entries"]]
    return head + (_table(["#", "kind", "time", "entry hash", "in checkpoint"], rows, num_from=5) if rows else
                   "<p>No entry of the log names this model.</p>")
