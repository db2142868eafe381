"use strict";
// The page of nanotorl.view. Model text is hostile: every piece of it enters the DOM through textContent (el()),
// never as markup. Each step's responses are one JSON element ("chunk"), parsed the first time it is shown.

const PAGE = 25;  // responses per page
const MODES = {train: "training", greedy: "held-out, greedy", sampled: "held-out, sampled"};
const COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#6e7781", "#bf3989", "#116329"];
const PY_KEYWORDS = "and as assert async await break class continue def del elif else except False finally for " +
  "from global if import in is lambda None nonlocal not or pass raise return True try while with yield";
const PY = new RegExp([
  /(#[^\n]*)/.source,                                                                  // 1 comment
  /("""[\s\S]*?(?:"""|$)|'''[\s\S]*?(?:'''|$)|"(?:\\.|[^"\\\n])*"?|'(?:\\.|[^'\\\n])*'?)/.source,  // 2 string
  /\b(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?j?)\b/.source,                                      // 3 number
  "\\b(" + PY_KEYWORDS.split(" ").join("|") + ")\\b",                                  // 4 keyword
  /\b([A-Za-z_]\w*)(?=\()/.source,                                                      // 5 call
].join("|"), "g");
const PY_CLASSES = [null, "com", "str", "num", "kw", "fn"];

const $ = (id) => document.getElementById(id);
const meta = JSON.parse($("meta").textContent);
const parsed = new Map();      // chunk index -> its records
const searchText = new Map();  // record -> its lowercased text
const state = {mode: "", page: 0, compare: null};
const markers = [];            // per curve panel: (step) => move its "current step" line

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function option(select, value, label) {
  const o = el("option", "", label);
  o.value = value;
  select.append(o);
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  return typeof v === "number" && !Number.isInteger(v) ? String(Number(v.toPrecision(3))) : String(v);
}

function records(i) {
  if (!parsed.has(i)) parsed.set(i, JSON.parse($("chunk" + i).textContent));
  return parsed.get(i);
}

function modeChunks(mode) {
  return meta.chunks.map((c, i) => i).filter((i) => meta.chunks[i].mode === mode);
}

function current() {
  return modeChunks(state.mode)[+$("step").value];
}

// ------------------------------------------------------------------------------------------------ controls

function setupControls() {
  const modes = [...new Set(meta.chunks.map((c) => c.mode))];
  modes.forEach((m) => option($("mode"), m, MODES[m] || m));
  option($("error"), "", "any");
  option($("error"), "none", "none");
  option($("error"), "some", "some");
  meta.errors.forEach((k) => option($("error"), "kind:" + k, k));
  option($("source"), "", "all");
  meta.sources.forEach((s) => option($("source"), "src:" + s, s));
  $("mode").addEventListener("change", () => selectMode($("mode").value));
  $("step").addEventListener("input", () => { state.page = 0; render(); });
  for (const id of ["outcome", "error", "flag", "source"]) {
    $(id).addEventListener("change", () => { state.page = 0; render(); });
  }
  $("search").addEventListener("input", () => { state.page = 0; render(); });
  $("prev").addEventListener("click", () => { state.page -= 1; render(); });
  $("next").addEventListener("click", () => { state.page += 1; render(); });
  if (modes.length) selectMode(modes[0]);
}

function selectMode(mode) {
  state.mode = mode;
  $("mode").value = mode;
  const n = modeChunks(mode).length;
  $("step").max = String(Math.max(n - 1, 0));
  $("step").value = String(Math.max(n - 1, 0));
  state.page = 0;
  render();
}

function filters() {
  return {outcome: $("outcome").value, error: $("error").value, flag: $("flag").value,
          source: $("source").value, query: $("search").value.trim().toLowerCase()};
}

function textOf(r) {
  const text = (p) => (p[0] === "code" ? p.slice(1, 4).join("") : p[1]);
  if (!searchText.has(r)) searchText.set(r, (r.prompt + "\n" + r.parts.map(text).join("")).toLowerCase());
  return searchText.get(r);
}

function matches(r, f) {
  if ((f.outcome === "correct" && !r.ok) || (f.outcome === "wrong" && r.ok)) return false;
  if ((f.error === "none" && r.errs.length) || (f.error === "some" && !r.errs.length)) return false;
  if (f.error.startsWith("kind:") && !r.errs.includes(f.error.slice(5))) return false;
  if ((f.flag === "void" && !r.void) || (f.flag === "trunc" && !r.trunc)) return false;
  if (f.flag === "untrained" && r.trained !== false) return false;
  if (f.source && "src:" + r.src !== f.source) return false;
  return !f.query || textOf(r).includes(f.query);
}

function render() {
  const i = current();
  const chunk = meta.chunks[i];
  const all = chunk ? records(i) : [];
  const f = filters();
  const shown = all.filter((r) => matches(r, f));
  const pages = Math.max(1, Math.ceil(shown.length / PAGE));
  state.page = Math.min(Math.max(state.page, 0), pages - 1);
  $("step-label").textContent = chunk ? String(chunk.step) : "";
  $("count").textContent = chunk ? `${shown.length} of ${all.length} responses at step ${chunk.step}` +
    (pages > 1 ? `, page ${state.page + 1} of ${pages}` : "") : "no responses in this file";
  $("prev").disabled = state.page === 0;
  $("next").disabled = state.page >= pages - 1;
  const page = shown.slice(state.page * PAGE, (state.page + 1) * PAGE);
  $("list").replaceChildren(...page.map((r) => responseEl(r, chunk, f.query, true)));
  if (chunk && !shown.length) $("list").append(el("p", "empty", "no response matches the filters"));
  if (chunk) markers.forEach((move) => move(chunk.step));
}

// ----------------------------------------------------------------------------------------------- responses

function badge(text, kind) {
  return el("span", "badge" + (kind ? " " + kind : ""), text);
}

function withMarks(parent, text, query) {
  // ``text`` as text nodes, each occurrence of ``query`` (lowercase) in a <mark>
  const low = text.toLowerCase();
  let at = 0;
  for (let hit = query ? low.indexOf(query) : -1; hit >= 0; hit = low.indexOf(query, at)) {
    parent.append(document.createTextNode(text.slice(at, hit)), el("mark", "", text.slice(hit, hit + query.length)));
    at = hit + query.length;
  }
  parent.append(document.createTextNode(text.slice(at)));
  return parent;
}

function highlighted(parent, code) {
  // Python, coloured by PY's groups; each piece a text node or a span's textContent
  let at = 0;
  for (const m of code.matchAll(PY)) {
    if (!m[0]) continue;
    parent.append(document.createTextNode(code.slice(at, m.index)));
    const group = m.findIndex((g, k) => k > 0 && g !== undefined);
    parent.append(el("span", PY_CLASSES[group], m[0]));
    at = m.index + m[0].length;
  }
  parent.append(document.createTextNode(code.slice(at)));
  return parent;
}

function partEl(part, query) {
  const [kind, ...rest] = part;
  if (kind === "text") return withMarks(el("pre", "part-text"), rest[0], query);
  if (kind === "code") {
    const [opening, body, closing, lang] = rest;
    const box = el("div", "part-code");
    box.append(el("span", "label", `${lang || "code"} block${closing ? "" : " (not closed)"}`));
    const pre = el("pre");
    pre.append(el("span", "fence", opening));
    if (["python", "py", "python3"].includes(lang)) highlighted(pre, body); else pre.append(body);
    pre.append(el("span", "fence", closing));
    box.append(pre);
    return box;
  }
  const [text, error, infra] = rest;
  const box = el("div", "part-output");
  const what = infra ? `sandbox failure (${error})` : error ? `error: ${error}` : "ok";
  box.append(el("span", "label", `tool output, ${what} · masked: not trained`));
  box.append(withMarks(el("pre"), text, query));
  return box;
}

function responseEl(r, chunk, query, comparable) {
  const box = el("article", "response " + (r.ok ? "correct" : "wrong"));
  const head = el("div", "head");
  const sample = chunk.mode === "train" ? ` #${r.i}` : chunk.mode === "sampled" ? ` sample ${r.i}` : "";
  head.append(el("span", "who", `${r.src ? r.src + " · " : ""}${r.id}${sample} · step ${chunk.step}`));
  head.append(badge(r.ok ? "correct" : "wrong", r.ok ? "good" : "bad"), badge("reward " + fmt(r.r)));
  if (r.adv !== null && r.adv !== undefined) head.append(badge("advantage " + fmt(r.adv)));
  head.append(badge("answer " + (r.ans === null ? "none" : r.ans)), badge("gold " + r.gold));
  head.append(badge(r.fin, r.fin === "eos" ? "" : "warn"));
  r.errs.forEach((k) => head.append(badge("tool error: " + k, "bad")));
  if (r.void) head.append(badge("void turn", "warn"));
  if (r.trunc) head.append(badge("truncated", "warn"));
  if (r.trained === false) head.append(badge("not trained", "warn"));
  head.append(badge(`${r.tok} tokens`));
  if (r.gap !== null && r.gap !== undefined) head.append(badge(`log-prob gap ${r.gap.toExponential(1)}`));
  if (comparable && chunk.mode !== "train" && modeChunks(chunk.mode).length > 1) {
    const b = el("button", "compare", "compare steps");
    b.addEventListener("click", () => openCompare(r, chunk));
    head.append(b);
  }
  const prompt = el("details", "prompt");
  prompt.append(el("summary", "", "prompt"), el("pre", "", r.prompt));
  box.append(head, prompt, ...r.parts.map((p) => partEl(p, query)));
  return box;
}

// ---------------------------------------------------------------------------------------------- comparison

function openCompare(r, chunk) {
  const steps = modeChunks(chunk.mode);
  const here = meta.chunks.indexOf(chunk);
  const other = here === steps[steps.length - 1] ? steps[0] : steps[steps.length - 1];
  state.compare = {id: r.id, src: r.src, mode: chunk.mode, sides: [Math.min(here, other), Math.max(here, other)]};
  renderCompare();
  $("compare").scrollIntoView();
}

function renderCompare() {
  const box = $("compare");
  const c = state.compare;
  box.hidden = !c;
  if (!c) return box.replaceChildren();
  const title = el("h2", "", `${c.src ? c.src + " · " : ""}${c.id} at two steps `);
  const close = el("button", "", "close");
  close.addEventListener("click", () => { state.compare = null; renderCompare(); });
  title.append(close);
  const cols = el("div", "cols");
  c.sides.forEach((i, side) => {
    const col = el("div", "side");
    const pick = el("select", "side-step");
    modeChunks(c.mode).forEach((j) => option(pick, String(j), "step " + meta.chunks[j].step));
    pick.value = String(i);
    pick.addEventListener("change", () => { c.sides[side] = +pick.value; renderCompare(); });
    const rec = records(i).find((x) => x.id === c.id && x.src === c.src);
    col.append(pick, rec ? responseEl(rec, meta.chunks[i], "", false) : el("p", "empty", "not logged at this step"));
    cols.append(col);
  });
  box.replaceChildren(title, cols);
}

// -------------------------------------------------------------------------------------------------- curves

function panel(title, series) {
  const W = 270, H = 150, L = 36, R = 8, T = 6, B = 18;
  const points = Object.values(series).flat();
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), Y = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  const box = el("div", "panel");
  const plot = svg("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`});
  plot.append(svg("line", {x1: L, x2: L, y1: T, y2: H - B, class: "axis"}),
              svg("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis"}));
  for (const [v, x, y, anchor] of [[y1, L - 3, T + 8, "end"], [y0, L - 3, H - B, "end"], [x0, L, H - 4, "start"],
                                   [x1, W - R, H - 4, "end"]]) {
    const t = svg("text", {x, y, "text-anchor": anchor, class: "tick"});
    t.textContent = fmt(v);
    plot.append(t);
  }
  const legend = el("div", "legend");
  Object.entries(series).forEach(([key, pts], k) => {
    const color = COLORS[k % COLORS.length];
    plot.append(svg("polyline", {points: pts.map((p) => `${X(p[0])},${Y(p[1])}`).join(" "), fill: "none",
                                 stroke: color, "stroke-width": 1.5}));
    if (pts.length <= 40) pts.forEach((p) => plot.append(svg("circle", {cx: X(p[0]), cy: Y(p[1]), r: 2, fill: color})));
    const swatch = el("i");
    swatch.style.background = color;
    legend.append(swatch, document.createTextNode(key));
  });
  const here = svg("line", {y1: T, y2: H - B, class: "here"});
  const hover = svg("line", {y1: T, y2: H - B, class: "hover", visibility: "hidden"});
  const tip = el("div", "tip");
  tip.hidden = true;
  plot.append(here, hover);
  markers.push((step) => { here.setAttribute("x1", X(step)); here.setAttribute("x2", X(step)); });
  const steps = [...new Set(xs)].sort((a, b) => a - b);
  const nearest = (event) => {
    const x = x0 + (event.offsetX - L) / (W - L - R) * (x1 - x0);
    return steps.reduce((best, s) => (Math.abs(s - x) < Math.abs(best - x) ? s : best), steps[0]);
  };
  plot.addEventListener("mousemove", (event) => {
    const s = nearest(event);
    hover.setAttribute("x1", X(s));
    hover.setAttribute("x2", X(s));
    hover.setAttribute("visibility", "visible");
    const values = Object.entries(series).map(([key, pts]) => [key, pts.find((p) => p[0] === s)])
      .filter(([, p]) => p).map(([key, p]) => `${key}: ${fmt(p[1])}`);
    tip.textContent = [`step ${s}`, ...values].join("\n");
    tip.style.left = `${Math.min(X(s) + 12, W - 120)}px`;
    tip.hidden = false;
  });
  plot.addEventListener("mouseleave", () => { hover.setAttribute("visibility", "hidden"); tip.hidden = true; });
  plot.addEventListener("click", (event) => jumpTo(nearest(event)));
  box.append(el("h3", "", title), plot, legend, tip);
  return box;
}

function jumpTo(step) {
  // the slider to the logged step of the current mode closest to ``step``
  const steps = modeChunks(state.mode).map((i) => meta.chunks[i].step);
  if (!steps.length) return;
  const k = steps.reduce((best, s, j) => (Math.abs(s - step) < Math.abs(steps[best] - step) ? j : best), 0);
  $("step").value = String(k);
  state.page = 0;
  render();
}

for (const [title, series] of Object.entries(meta.curves)) {
  if (Object.keys(series).length) $("curves").append(panel(title, series));
}
setupControls();
