"use strict";
(() => {
  const data = JSON.parse(document.getElementById("attnscan-data").textContent);
  const byId = (id) => document.getElementById(id);
  const minus = (s) => s.replace(/-/g, "\u2212");
  const tip = byId("tip");

  // ---- sortable tables -------------------------------------------------------------------------------------------
  const sortTable = (table, col, th) => {
    const dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
    table.querySelectorAll("thead th").forEach((h) => h.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", dir);
    const numeric = th.dataset.type === "num";
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    const key = (row) => {
      const cell = row.cells[col];
      const raw = cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent;
      if (!numeric) return raw.toLowerCase();
      const v = parseFloat(raw);
      return Number.isFinite(v) ? v : null;
    };
    const sign = dir === "ascending" ? 1 : -1;
    rows.sort((a, b) => {
      const ka = key(a), kb = key(b);
      if (ka === null || kb === null) return (ka === null) - (kb === null);
      return ka < kb ? -sign : ka > kb ? sign : 0;
    });
    rows.forEach((r) => body.appendChild(r));
  };
  document.querySelectorAll("table.sortable").forEach((table) => {
    table.querySelectorAll("thead th").forEach((th, col) => {
      th.tabIndex = 0;
      th.addEventListener("click", () => sortTable(table, col, th));
      th.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") {
          e.preventDefault();
          sortTable(table, col, th);
        }
      });
    });
  });

  // ---- heatmaps --------------------------------------------------------------------------------------------------
  const models = data.models;
  const hexLut = (hex) => {
    const out = new Uint8Array(768);
    for (let i = 0; i < 768; i++) out[i] = parseInt(hex.substr(2 * i, 2), 16);
    return out;
  };
  const luts = { log: hexLut(data.colors.log), diff: hexLut(data.colors.diff) };
  const nanRgb = [1, 3, 5].map((i) => parseInt(data.colors.nan.substr(i, 2), 16));
  const TITLES = { benign: "Benign", jailbreak: "Jailbreak", diff: "Difference" };

  // code -> value and code -> RGBA for one model and kind (log maps or difference)
  const tables = new Map();
  const codeTable = (m, kind) => {
    const family = kind === "diff" ? "diff" : "log";
    const key = m + "|" + family;
    if (tables.has(key)) return tables.get(key);
    const enc = models[m].maps.encoding[family];
    const [lo, hi] = data.ranges[family];
    const values = new Float64Array(256);
    const rgba = new Uint8ClampedArray(1024);
    const lut = luts[family];
    const scale = enc.kind === "asinh" ? Math.asinh(enc.max / enc.scale) : 0;
    for (let c = 0; c < 256; c++) {
      let v = NaN;
      if (c !== enc.nan) {
        v = enc.kind === "asinh"
          ? enc.scale * Math.sinh(((c - 127) / 127) * scale)
          : enc.lo + (c / 254) * (enc.hi - enc.lo);
      }
      values[c] = v;
      if (Number.isNaN(v)) {
        rgba.set([nanRgb[0], nanRgb[1], nanRgb[2], 255], 4 * c);
      } else {
        const t = Math.min(255, Math.max(0, Math.round(((v - lo) / (hi - lo)) * 255)));
        rgba.set([lut[3 * t], lut[3 * t + 1], lut[3 * t + 2], 255], 4 * c);
      }
    }
    const table = { values, rgba };
    tables.set(key, table);
    return table;
  };
  const decoded = new Map();
  const viewName = (m) => (state.zoom && models[m].maps.zoom ? "zoom" : "full");
  const codes = (m, view, kind, li) => {
    const key = m + "|" + view + "|" + kind + "|" + li;
    if (!decoded.has(key)) {
      const bin = atob(models[m].maps[view].data[kind][li]);
      const out = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
      decoded.set(key, out);
    }
    return decoded.get(key);
  };

  const G = { left: 46, right: 12, top: 26, plot: 300, below: 86 };
  const WIDTH = G.left + G.plot + G.right, HEIGHT = G.top + G.plot + G.below;
  const tickStep = (t) => {
    if (t >= 128) return 64 * Math.ceil(t / 64 / 8);
    const raw = t / 6;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const k of [1, 2, 5, 10]) if (k * mag >= raw) return Math.max(1, k * mag);
    return Math.max(1, 10 * mag);
  };

  const state = { m: data.view.model, li: data.view.layer, zoom: true };
  const panelsEl = byId("hm-panels");
  const panels = [];
  const ensurePanels = (kinds) => {
    if (panels.length === kinds.length && panels.every((p, i) => p.kind === kinds[i])) return;
    panels.length = 0;
    panelsEl.replaceChildren();
    kinds.forEach((kind) => {
      const canvas = document.createElement("canvas");
      canvas.className = "heatmap";
      canvas.dataset.kind = kind;
      const ratio = window.devicePixelRatio || 1;
      canvas.width = Math.round(WIDTH * ratio);
      canvas.height = Math.round(HEIGHT * ratio);
      canvas.style.width = WIDTH + "px";
      canvas.style.height = HEIGHT + "px";
      canvas.setAttribute("role", "img");
      canvas.setAttribute("aria-label", TITLES[kind] + " heatmap");
      const off = document.createElement("canvas");
      const panel = { kind, canvas, off, ratio };
      canvas.addEventListener("mousemove", (e) => hover(panel, e));
      canvas.addEventListener("mouseleave", () => { tip.hidden = true; });
      panelsEl.appendChild(canvas);
      panels.push(panel);
    });
  };

  const drawPanel = (panel, m, li) => {
    const maps = models[m].maps, vname = viewName(m), view = maps[vname];
    const n = view.size, T = view.extent, kind = panel.kind, family = kind === "diff" ? "diff" : "log";
    const { rgba } = codeTable(m, kind);
    const c = codes(m, vname, kind, li);
    panel.off.width = n;
    panel.off.height = n;
    const octx = panel.off.getContext("2d");
    const img = octx.createImageData(n, n);
    for (let i = 0; i < c.length; i++) img.data.set(rgba.subarray(4 * c[i], 4 * c[i] + 4), 4 * i);
    octx.putImageData(img, 0, 0);
    const ctx = panel.canvas.getContext("2d");
    ctx.setTransform(panel.ratio, 0, 0, panel.ratio, 0, 0);
    ctx.clearRect(0, 0, WIDTH, HEIGHT);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(panel.off, G.left, G.top, G.plot, G.plot);
    ctx.fillStyle = "#1d1d1f";
    ctx.font = "600 14px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.fillText(TITLES[kind], G.left + G.plot / 2, 17);
    // axes: token positions 0..T, query down, key across
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#444";
    ctx.strokeStyle = "#444";
    ctx.lineWidth = 1;
    const step = tickStep(T);
    const ticks = [];
    for (let p = 0; p <= T; p += step) ticks.push(p);
    if (T - ticks[ticks.length - 1] >= step / 2) ticks.push(T);
    for (const p of ticks) {
      const off = (p / T) * G.plot;
      ctx.beginPath();
      ctx.moveTo(G.left + off, G.top + G.plot);
      ctx.lineTo(G.left + off, G.top + G.plot + 4);
      ctx.moveTo(G.left - 4, G.top + off);
      ctx.lineTo(G.left, G.top + off);
      ctx.stroke();
      ctx.textAlign = "center";
      ctx.fillText(String(p), G.left + off, G.top + G.plot + 15);
      ctx.textAlign = "right";
      ctx.fillText(String(p), G.left - 6, G.top + off + 4);
    }
    ctx.textAlign = "center";
    ctx.fillStyle = "#222";
    ctx.font = "12px system-ui, sans-serif";
    ctx.fillText("Key token", G.left + G.plot / 2, G.top + G.plot + 30);
    ctx.save();
    ctx.translate(12, G.top + G.plot / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.fillText("Query token", 0, 0);
    ctx.restore();
    // colour bar
    const lut = luts[family];
    const [lo, hi] = data.ranges[family];
    const barY = G.top + G.plot + 40, barH = 10;
    for (let i = 0; i < 256; i++) {
      ctx.fillStyle = "rgb(" + lut[3 * i] + "," + lut[3 * i + 1] + "," + lut[3 * i + 2] + ")";
      const x0 = G.left + (i / 256) * G.plot;
      ctx.fillRect(x0, barY, Math.min(G.plot / 256 + 0.6, G.left + G.plot - x0), barH);
    }
    ctx.strokeStyle = "#999";
    ctx.strokeRect(G.left + 0.5, barY + 0.5, G.plot - 1, barH - 1);
    ctx.fillStyle = "#444";
    ctx.font = "11px system-ui, sans-serif";
    const bstep = family === "diff" ? 2 : 2;
    for (let v = lo; v <= hi + 1e-9; v += bstep) {
      const x = G.left + ((v - lo) / (hi - lo)) * G.plot;
      ctx.textAlign = v === lo ? "left" : v >= hi - 1e-9 ? "right" : "center";
      ctx.fillText(minus((v > 0 && family === "diff" ? "+" : "") + v), x, barY + barH + 13);
    }
    ctx.textAlign = "center";
    const label = family === "diff" ? "\u0394 log attention (jailbreak \u2212 benign)" : "log attention";
    ctx.fillText(label, G.left + G.plot / 2, barY + barH + 27);
    panel.canvas.dataset.layer = String(maps.layers[li]);
    panel.canvas.dataset.view = vname;
  };

  const fmtValue = (v, signed) => {
    if (Number.isNaN(v)) return signed ? "\u2014 (not reached by both sets)" : "\u2014 (no prompt reaches)";
    return minus((signed && v > 0 ? "+" : "") + v.toFixed(2));
  };
  const span = (a, b) => (a === b ? String(a) : a + "\u2013" + b);
  const tokenText = (tokens, a, b) => {
    if (!tokens || a >= tokens.length) return "";
    const parts = [];
    for (let p = a; p <= Math.min(b, tokens.length - 1); p++) parts.push(JSON.stringify(tokens[p]));
    return parts.join(" ");
  };
  const hover = (panel, e) => {
    const rect = panel.canvas.getBoundingClientRect();
    const x = e.clientX - rect.left - G.left, y = e.clientY - rect.top - G.top;
    if (x < 0 || y < 0 || x >= G.plot || y >= G.plot) { tip.hidden = true; return; }
    const model = models[state.m], maps = model.maps, vname = viewName(state.m), view = maps[vname];
    const n = view.size, f = view.factor, T = view.extent;
    const col = Math.min(n - 1, Math.floor((x / G.plot) * n)), row = Math.min(n - 1, Math.floor((y / G.plot) * n));
    const q0 = row * f, q1 = Math.min(T - 1, row * f + f - 1), k0 = col * f, k1 = Math.min(T - 1, col * f + f - 1);
    const lines = ["Layer " + maps.layers[state.li] + (f > 1 ? "  (" + f + "\u00d7" + f + " block mean)" : ""),
      "query " + span(q0, q1) + "   key " + span(k0, k1)];
    const qt = tokenText(model.tokens, q0, q1), kt = tokenText(model.tokens, k0, k1);
    if (qt) lines.push("query tokens: " + qt);
    if (kt) lines.push("key tokens:   " + kt);
    if (model.tokens && (q1 >= model.tokens.length || k1 >= model.tokens.length)) {
      lines.push("(tokens past the shared prefix, position " + model.tokens.length + " on, vary by prompt)");
    }
    for (const kind of maps.kinds) {
      const v = codeTable(state.m, kind).values[codes(state.m, vname, kind, state.li)[row * n + col]];
      const mark = kind === panel.kind ? "\u25b8 " : "  ";
      lines.push(mark + (TITLES[kind] + ":").padEnd(12) + fmtValue(v, kind === "diff"));
    }
    const reach = [];
    for (const [name, counts] of Object.entries(maps.reach)) {
      const lo = Math.min(...counts.slice(q0, q1 + 1)), hi = Math.max(...counts.slice(q0, q1 + 1));
      reach.push(name + " " + span(lo, hi));
    }
    if (reach.length) lines.push("prompts reaching these query rows: " + reach.join(", "));
    tip.textContent = lines.join("\n");
    tip.hidden = false;
    const pad = 14, w = tip.offsetWidth, h = tip.offsetHeight;
    tip.style.left = Math.min(e.clientX + pad, window.innerWidth - w - 4) + "px";
    tip.style.top = Math.min(e.clientY + pad, window.innerHeight - h - 4) + "px";
  };

  const modelSel = byId("hm-model"), layerSel = byId("hm-layer"), caption = byId("hm-caption");
  const zoomBox = byId("hm-zoom"), zoomWrap = byId("hm-zoom-box"), zoomLabel = byId("hm-zoom-label");
  const fillLayers = () => {
    const model = models[state.m];
    layerSel.replaceChildren();
    model.layers.forEach((info, i) => {
      const opt = document.createElement("option");
      opt.value = String(i);
      opt.textContent = "Layer " + info.layer + (info.verdict ? " \u00b7 " + info.verdict : "");
      layerSel.appendChild(opt);
    });
  };
  const render = () => {
    const model = models[state.m];
    const section = byId("heatmaps");
    ensurePanels(model.maps.kinds);
    panels.forEach((p) => drawPanel(p, state.m, state.li));
    const zoom = model.maps.zoom;
    zoomWrap.hidden = !zoom;
    if (zoom) zoomLabel.textContent = "Zoom to positions 0\u2013" + (zoom.extent - 1) + " (reached by every set)";
    zoomBox.checked = state.zoom;
    section.dataset.view = viewName(state.m);
    modelSel.value = String(state.m);
    layerSel.value = String(state.li);
    caption.textContent = model.captions[state.li];
    section.dataset.model = model.label;
    section.dataset.layer = String(model.maps.layers[state.li]);
    document.querySelectorAll("tr.pick").forEach((tr) => {
      tr.classList.toggle("sel", tr.dataset.model === String(state.m) && tr.dataset.layer === section.dataset.layer);
    });
  };
  const select = (m, layer) => {
    const li = models[m].maps.layers.indexOf(layer);
    if (li < 0) return;
    if (m !== state.m) { state.m = m; fillLayers(); }
    state.li = li;
    render();
  };
  modelSel.addEventListener("change", () => {
    state.m = Number(modelSel.value);
    state.li = 0;
    fillLayers();
    render();
  });
  layerSel.addEventListener("change", () => { state.li = Number(layerSel.value); render(); });
  zoomBox.addEventListener("change", () => { state.zoom = zoomBox.checked; render(); });
  const stepLayer = (d) => {
    const n = models[state.m].maps.layers.length;
    state.li = (state.li + d + n) % n;
    render();
  };
  byId("hm-prev").addEventListener("click", () => stepLayer(-1));
  byId("hm-next").addEventListener("click", () => stepLayer(1));
  const pick = (el) => {
    select(Number(el.dataset.model), Number(el.dataset.layer));
    byId("heatmaps").scrollIntoView({ behavior: "smooth", block: "start" });
  };
  document.querySelectorAll("tr.pick, circle.pt").forEach((el) => {
    el.addEventListener("click", () => pick(el));
    el.addEventListener("keydown", (e) => { if (e.key === "Enter") pick(el); });
  });
  fillLayers();
  render();
})();
