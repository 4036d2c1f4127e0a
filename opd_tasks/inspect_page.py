"""The HTML page of `opd inspect --html` (opd_tasks/inspect_html.py fills __TITLE__ and __DATA__).

Self-contained: inline CSS and JS, no network. Data strings are set with textContent only (never
parsed as HTML). DOM contract, relied on by tests/test_inspect_html.py:
  .sample[data-sample-id]           one per sample, in display order (hidden ones: .hidden)
  .tok[data-s][data-p]              token p of sample s (index into the embedded samples)
  #details [data-field][data-value] the hovered or pinned token: b, T, t.NAME, ref, gap, gap.NAME,
                                    topk.NAME (rows .alt[data-id][data-value])
  #domain, #rmin, #rmax, #reason, #metric, #sort   controls; #count the "showing X of Y" line
  body[data-ready="1"]              set once the page has rendered
"""

PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:13px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{padding:10px 16px;background:#fff;border-bottom:1px solid #ddd}
h1{font-size:16px;margin:0 0 4px}
.note{color:#666}
table.sum{border-collapse:collapse;margin:6px 18px 6px 0;display:inline-table;vertical-align:top}
table.sum th,table.sum td{border:1px solid #e2e2e2;padding:2px 7px;text-align:right}
table.sum th{background:#f3f3f3;font-weight:600}
table.sum td:first-child,table.sum th:first-child{text-align:left}
#controls{position:sticky;top:0;z-index:2;background:#f0f2f5;padding:6px 16px;border-bottom:1px solid #ddd}
#controls label{margin-right:12px}
#controls input{width:60px}
#legend span{display:inline-block;padding:0 5px;margin-left:2px;border-radius:2px}
main{display:flex;align-items:flex-start}
#samples{flex:1;padding:8px 16px;min-width:0}
.sample{background:#fff;border:1px solid #e2e2e2;border-radius:4px;margin:0 0 8px;padding:6px 8px}
.sample.hidden{display:none}
.shead{color:#444;margin-bottom:3px}
.shead b{color:#000}
.prompt{color:#777;font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;margin-bottom:2px}
.resp{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-all}
.tok{cursor:pointer;border-radius:2px;padding:0 1px;border-bottom:1px solid transparent}
.tok:hover{outline:1px solid #333}
.tok.nob{border-bottom:1px dashed #aaa}
.tok.pinned{outline:2px solid #000}
aside{position:sticky;top:44px;width:360px;max-height:calc(100vh - 60px);overflow:auto;margin:8px 16px 8px 0;
  background:#fff;border:1px solid #ccc;border-radius:4px;padding:8px}
#details table{border-collapse:collapse;width:100%}
#details td{padding:1px 4px;border-bottom:1px solid #f0f0f0}
#details td.v{text-align:right;font-family:ui-monospace,Menlo,Consolas,monospace}
#details h3{font-size:13px;margin:8px 0 2px}
.alt.sampled{font-weight:700}
</style></head>
<body>
<header id="summary"></header>
<div id="controls">
 <label>color <select id="metric"></select></label>
 <label>full color at <input id="scale" type="number" step="0.5" min="0.1" value="3"> nats</label>
 <label>domain <select id="domain"></select></label>
 <label>reward from <input id="rmin" type="number" step="any"> to <input id="rmax" type="number" step="any"></label>
 <label id="reasonbox">filter <select id="reason"></select></label>
 <label>sort <select id="sort"><option value="disagreement">by disagreement</option>
   <option value="logp">by teacher log-prob per token (lowest first)</option><option value="reward">by reward</option><option value="length">by length</option>
   <option value="id">by sample id</option></select></label>
 <span id="count"></span> <span id="legend"></span>
</div>
<main><div id="samples"></div><aside id="details"><i>hover a token for its log-probs; click to pin it</i></aside></main>
<script type="application/json" id="opd-data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("opd-data").textContent);
const S = D.samples, SUM = D.summary;
let pinned = null;
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "cls") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
  }
  for (const k of kids) e.append(k instanceof Node ? k : String(k));
  return e;
}
const fmt = x => x === null || x === undefined ? "-" : (typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toFixed(4)) : String(x));
const tokText = id => { const t = D.vocab[String(id)]; return t === null || t === undefined ? "#" + id : (t === "" ? "\u2205" : t.replace(/\n/g, "\u21b5\n")); };
function table(head, rows) {
  return el("table", {cls: "sum"}, el("tr", {}, ...head.map(h => el("th", {}, h))),
            ...rows.map(r => el("tr", {}, ...r.map(c => el("td", {}, fmt(c))))));
}
function header() {
  const h = document.getElementById("summary");
  const it = SUM.iteration === null || SUM.offline ? "" : " iteration " + SUM.iteration;
  h.append(el("h1", {}, (SUM.offline ? "offline phase" : "scored stage") + it + ": where teachers and student disagree"));
  h.append(el("div", {cls: "note"}, SUM.stage_dir + " \u2014 " + SUM.samples + " samples, " + SUM.tokens +
    " response tokens, combination " + fmt(SUM.combination) + "; " + SUM.tokenizer));
  h.append(el("div", {id: "sampled"}, "showing " + SUM.shown + " of " + SUM.samples + " samples" +
    (SUM.sampled ? " (" + SUM.sampled + "); the tables cover all " + SUM.samples : "")));
  const kd = SUM.teacher_kl_on_domain;
  const rows = SUM.teachers.map(t => [t.teacher, t.weight, kd[t.teacher].domain, kd[t.teacher].kl_k1, kd[t.teacher].kl_k3,
                                      t.kl_k1, t.mean_logp, t.mixture_share]);
  rows.push(["combined (" + fmt(SUM.combined.mode) + ")", null, null, null, null, SUM.combined.kl_k1, SUM.combined.mean_logp, null]);
  if (SUM.reference) rows.push(["reference", null, null, null, null, SUM.reference.kl_k1, SUM.reference.mean_logp, null]);
  h.append(table(["teacher", "weight", "domain", "KL k1 on domain", "KL k3 on domain", "KL k1 all", "mean log-prob",
                  "mixture share"], rows));
  h.append(table(["domain", "samples", "tokens", "mean reward", "mean |b - T|"],
                 SUM.domains.map(d => [d.domain, d.samples, d.tokens, d.mean_reward, d.mean_abs_diff])));
  const r = SUM.rewards, L = SUM.lengths;
  h.append(table(["", "mean", "min", "max", "count"], [["reward", r.mean, r.min, r.max, r.count + " (" + r.missing + " missing)"],
    ["prompt length", L.prompt.mean, L.prompt.min, L.prompt.max, L.prompt.count],
    ["response length", L.response.mean, L.response.min, L.response.max, L.response.count]]));
  h.append(table(["finish reason", "samples"], Object.entries(L.finish_reason)));
  if (SUM.filter) h.append(table(["offline filter", "samples"], Object.entries(SUM.filter)));
}
function controls() {
  const anyB = S.some(s => s.b !== null);
  const m = document.getElementById("metric");
  if (anyB) {
    m.append(el("option", {value: "T"}, "T - b (combined teacher - student)"));
    for (const k of D.teachers) m.append(el("option", {value: "t:" + k}, "T." + k + " - b"));
  }
  m.append(el("option", {value: "logp"}, "T (combined teacher log-prob)"));
  if (!anyB) document.getElementById("sort").value = "logp";  // no student log-probs: nothing to disagree with
  const d = document.getElementById("domain");
  d.append(el("option", {value: "*"}, "all"));
  for (const x of [...new Set(S.map(s => s.domain))].sort()) d.append(el("option", {value: x === null ? "\u0000" : x}, x === null ? "(none)" : x));
  const rs = document.getElementById("reason");
  const reasons = [...new Set(S.map(s => s.filter).filter(x => x !== null))].sort();
  if (!reasons.length) document.getElementById("reasonbox").style.display = "none";
  rs.append(el("option", {value: "*"}, "all"));
  for (const x of reasons) rs.append(el("option", {value: x}, x));
  for (const id of ["metric", "scale", "domain", "rmin", "rmax", "reason", "sort"])
    document.getElementById(id).addEventListener(["scale", "rmin", "rmax"].includes(id) ? "input" : "change", update);
}
function value(s, p, metric) {
  const T = s.T[p];
  if (metric === "logp") return T;
  if (s.b === null) return null;
  const t = metric === "T" ? T : s.t[metric.slice(2)][p];
  return t - s.b[p];
}
function color(v, metric, scale) {
  if (v === null) return "";
  const a = Math.min(1, Math.abs(v) / scale) * 0.8;
  if (metric === "logp" || v < 0) return "rgba(220,40,40," + a.toFixed(3) + ")";
  return "rgba(40,100,230," + a.toFixed(3) + ")";
}
function samples() {
  const box = document.getElementById("samples");
  S.forEach((s, i) => {
    const head = el("div", {cls: "shead"}, el("b", {}, s.id), " \u00b7 domain " + fmt(s.domain) + " \u00b7 reward " + fmt(s.reward) +
      " \u00b7 " + s.finish + " \u00b7 " + s.tokens.length + " tokens \u00b7 mean |b - T| " + fmt(s.disagreement) +
      (s.filter ? " \u00b7 filter: " + s.filter : ""));
    const prompt = el("div", {cls: "prompt"}, "prompt: " + (s.prompt !== null ? s.prompt : s.prompt_ids.join(" ")));
    const resp = el("div", {cls: "resp"});
    s.tokens.forEach((id, p) => resp.append(el("span", {cls: "tok" + (s.b === null ? " nob" : ""), "data-s": i, "data-p": p}, tokText(id))));
    box.append(el("div", {cls: "sample", "data-sample-id": s.id, "data-i": i}, head, prompt, resp));
  });
  box.addEventListener("mouseover", e => { const t = e.target.closest(".tok"); if (t && pinned === null) show(t); });
  box.addEventListener("click", e => {
    const t = e.target.closest(".tok"); if (!t) return;
    if (pinned) pinned.classList.remove("pinned");
    pinned = pinned === t ? null : t;
    if (pinned) pinned.classList.add("pinned");
    show(t);
  });
}
function row(label, field, v) {
  return el("tr", {}, el("td", {}, label), el("td", {cls: "v", "data-field": field, "data-value": v === null || v === undefined ? "" : String(v)}, fmt(v)));
}
function show(t) {
  const s = S[+t.dataset.s], p = +t.dataset.p, id = s.tokens[p];
  const det = document.getElementById("details");
  det.replaceChildren();
  det.append(el("div", {}, el("b", {}, s.id), " position " + p + (pinned ? " (pinned: click again to release)" : "")));
  det.append(el("div", {cls: "resp"}, "token " + JSON.stringify(tokText(id)) + " (id " + id + ")"));
  const b = s.b === null ? null : s.b[p];
  const rows = [row("b (behaviour)", "b", b), row("T (combined, " + fmt(SUM.combination) + ")", "T", s.T[p])];
  for (const k of D.teachers) rows.push(row("T." + k, "t." + k, s.t[k][p]));
  if (D.has_ref) rows.push(row("ref", "ref", s.ref === null ? null : s.ref[p]));
  rows.push(row("T - b", "gap", b === null ? null : s.T[p] - b));
  for (const k of D.teachers) rows.push(row("T." + k + " - b", "gap." + k, b === null ? null : s.t[k][p] - b));
  det.append(el("table", {}, ...rows));
  for (const k of Object.keys(s.topk)) {
    const alts = s.topk[k][p]; if (!alts) continue;
    det.append(el("h3", {}, "top-" + alts[0].length + " of " + k));
    det.append(el("table", {"data-field": "topk." + k}, ...alts[0].map((a, j) =>
      el("tr", {cls: "alt" + (a === id ? " sampled" : ""), "data-id": a, "data-value": String(alts[1][j])},
         el("td", {}, JSON.stringify(tokText(a)) + " (" + a + ")"), el("td", {cls: "v"}, fmt(alts[1][j]))))));
  }
  if (!Object.keys(s.topk).length && D.has_topk.length === 0) det.append(el("div", {cls: "note"}, "no top-k alternatives stored (scoring.top_k)"));
}
function update() {
  const metric = document.getElementById("metric").value, scale = +document.getElementById("scale").value || 3;
  const dom = document.getElementById("domain").value, reason = document.getElementById("reason").value;
  const rmin = document.getElementById("rmin").value, rmax = document.getElementById("rmax").value;
  const sort = document.getElementById("sort").value;
  const box = document.getElementById("samples");
  const nodes = [...box.children];
  const key = {disagreement: s => -(s.disagreement === null ? -1 : s.disagreement), reward: s => -(s.reward === null ? -Infinity : s.reward),
               length: s => -s.tokens.length, id: s => 0,
               logp: s => s.T.length ? s.T.reduce((a, x) => a + x, 0) / s.T.length : Infinity}[sort];
  nodes.sort((a, b) => { const x = S[+a.dataset.i], y = S[+b.dataset.i];
    return sort === "id" ? (x.id < y.id ? -1 : x.id > y.id ? 1 : 0) : key(x) - key(y) || (+a.dataset.i) - (+b.dataset.i); });
  let shown = 0;
  for (const n of nodes) {
    const s = S[+n.dataset.i];
    const ok = (dom === "*" || (s.domain === null ? "\u0000" : s.domain) === dom) && (reason === "*" || s.filter === reason)
      && (rmin === "" || (s.reward !== null && s.reward >= +rmin)) && (rmax === "" || (s.reward !== null && s.reward <= +rmax));
    n.classList.toggle("hidden", !ok); shown += ok;
    box.append(n);
  }
  for (const t of box.querySelectorAll(".tok")) t.style.background = color(value(S[+t.dataset.s], +t.dataset.p, metric), metric, scale);
  document.getElementById("count").textContent = "showing " + shown + " of " + S.length + " samples on this page (" + SUM.samples + " in the stage)";
  const lg = document.getElementById("legend"); lg.replaceChildren();
  if (metric === "logp") lg.append("low teacher log-prob ", el("span", {style: "background:" + color(-scale, metric, scale)}, "-" + scale));
  else lg.append(el("span", {style: "background:" + color(-scale, metric, scale)}, "teacher < student"),
                 el("span", {style: "background:" + color(scale, metric, scale)}, "teacher > student"));
}
header(); controls(); samples(); update();
document.body.dataset.ready = "1";
</script></body></html>
"""
