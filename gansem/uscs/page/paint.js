/* The USCS painting page: paint a mask with a KLiSH run's classes, ask the server for its image.
 *
 * The mask is the state: a Uint16Array of R * R class ids, row-major. The #mask canvas
 * (R x R pixels, scaled up by CSS) is redrawn from it in the palette's colours; #cursor, at
 * screen resolution, shows where the tool would land. Undo keeps whole copies of the mask.
 *
 * Server (gansem/uscs/server.py): GET /api/info, POST /generate {"mask": rows, "seed": s},
 * GET /api/example/<i>. Every error answer is {"error": message}; the page shows the message.
 */
"use strict";

(function () {
  const UNDO_LIMIT = 100;
  const $ = (id) => document.getElementById(id);

  const state = {
    run: "", k: 0, r: 0, maxSeed: 0, numExamples: 0,
    colours: null,     // Uint8Array [K * 3]
    names: [],         // K class names (editable, kept in localStorage)
    mask: null,        // Uint16Array [R * R] class ids
    classId: 0,
    tool: "brush",
    size: 3,
    undo: [],
    redo: [],
    stroke: null,      // {x, y}: the last point of the stroke being painted (pointer or Shift+arrows)
    cursor: null,      // {x, y}: the mask pixel under the pointer or the keyboard cursor
    busy: false,       // a /generate request is in flight
    queued: false,     // another one was asked for meanwhile
    generations: 0,
    image: null,       // {url, seed} of the image on show
  };

  let maskCanvas, maskContext, cursorCanvas;

  // ---------------------------------------------------------------- server

  /** fetch `path` and return its JSON object; throws an Error with the server's message otherwise. */
  async function api(path, options = {}) {
    let response;
    try {
      response = await fetch(path, options);
    } catch (err) {
      throw new Error(`the server did not answer (${err.message}); is launch/paint.py still running?`);
    }
    const type = response.headers.get("Content-Type") || "";
    let body = null;
    if (type.includes("application/json")) {
      try { body = await response.json(); } catch (_) { body = null; }
    }
    if (!response.ok) {
      const message = body && typeof body.error === "string" ? body.error : response.statusText;
      throw new Error(`${message} (HTTP ${response.status})`);
    }
    if (body === null || typeof body !== "object") {
      throw new Error(`unexpected answer from ${path} (${type || "no content type"})`);
    }
    return body;
  }

  // ---------------------------------------------------------------- messages

  function showError(message) {
    $("error-text").textContent = message;
    $("error").hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error-text").textContent = "";
  }

  function status(message) {
    $("status").textContent = message;
  }

  // ---------------------------------------------------------------- class names

  function namesKey() {
    return `gansem-uscs-names/${state.run}/${state.k}/${Array.from(state.colours).join(",")}`;
  }

  function loadNames(defaults) {
    try {
      const saved = JSON.parse(localStorage.getItem(namesKey()) || "null");
      if (Array.isArray(saved) && saved.length === state.k && saved.every((n) => typeof n === "string")) {
        return saved;
      }
    } catch (_) { /* storage unavailable or corrupt: the run's names */ }
    return defaults.slice();
  }

  function saveNames() {
    try { localStorage.setItem(namesKey(), JSON.stringify(state.names)); } catch (_) { /* not kept */ }
  }

  function colourCss(i) {
    const c = state.colours;
    return `rgb(${c[3 * i]}, ${c[3 * i + 1]}, ${c[3 * i + 2]})`;
  }

  function buildPalette() {
    const container = $("palette");
    container.replaceChildren();
    for (let i = 0; i < state.k; i++) {
      const row = document.createElement("div");
      row.className = "class";
      row.id = `class-row-${i}`;

      const label = document.createElement("label");
      const radio = document.createElement("input");
      radio.type = "radio";
      radio.name = "class";
      radio.value = String(i);
      radio.id = `class-${i}`;
      radio.setAttribute("aria-labelledby", `class-${i}-id class-${i}-name`);
      radio.addEventListener("change", () => selectClass(i));
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.backgroundColor = colourCss(i);
      const id = document.createElement("span");
      id.className = "cid";
      id.id = `class-${i}-id`;
      id.textContent = String(i);
      label.append(radio, swatch, id);

      const name = document.createElement("input");
      name.type = "text";
      name.id = `class-${i}-name`;
      name.value = state.names[i];
      name.maxLength = 60;
      name.spellcheck = false;
      name.setAttribute("aria-label", `Name of class ${i}`);
      name.addEventListener("input", () => {
        state.names[i] = name.value;
        saveNames();
        if (i === state.classId) updateMaskCaption();
      });
      name.addEventListener("focus", () => selectClass(i));

      row.append(label, name);
      if (i < 10) {
        const key = document.createElement("kbd");
        key.textContent = String((i + 1) % 10);
        row.append(key);
      }
      container.append(row);
    }
  }

  function selectClass(i) {
    if (i < 0 || i >= state.k) return;
    state.classId = i;
    for (let j = 0; j < state.k; j++) {
      $(`class-row-${j}`).classList.toggle("selected", j === i);
      $(`class-${j}`).checked = j === i;
    }
    updateMaskCaption();
    drawCursor();
  }

  function updateMaskCaption() {
    const name = state.names[state.classId] || `class ${state.classId}`;
    $("mask-caption").textContent = `· ${state.tool} with ${state.classId} (${name})`;
  }

  // ---------------------------------------------------------------- mask drawing

  function render() {
    const { r, mask, colours } = state;
    const image = maskContext.createImageData(r, r);
    const px = image.data;
    for (let p = 0; p < r * r; p++) {
      const c = 3 * mask[p];
      px[4 * p] = colours[c];
      px[4 * p + 1] = colours[c + 1];
      px[4 * p + 2] = colours[c + 2];
      px[4 * p + 3] = 255;
    }
    maskContext.putImageData(image, 0, 0);
  }

  /** The pixels a brush of `size` covers around (0, 0): a disc of that diameter. */
  function brushOffsets(size) {
    const lo = -Math.floor((size - 1) / 2);
    const centre = lo + (size - 1) / 2;
    const limit = (size / 2) * (size / 2) + 0.25;
    const out = [];
    for (let dy = lo; dy < lo + size; dy++) {
      for (let dx = lo; dx < lo + size; dx++) {
        if ((dx - centre) ** 2 + (dy - centre) ** 2 <= limit) out.push([dx, dy]);
      }
    }
    return out;
  }

  function stamp(x, y, offsets) {
    const { r, mask, classId } = state;
    for (const [dx, dy] of offsets) {
      const u = x + dx, v = y + dy;
      if (u >= 0 && u < state.r && v >= 0 && v < r) mask[v * r + u] = classId;
    }
  }

  function paintLine(a, b) {
    const offsets = brushOffsets(state.size);
    const steps = Math.max(Math.abs(b.x - a.x), Math.abs(b.y - a.y));
    for (let i = 0; i <= steps; i++) {
      const t = steps === 0 ? 0 : i / steps;
      stamp(Math.round(a.x + (b.x - a.x) * t), Math.round(a.y + (b.y - a.y) * t), offsets);
    }
  }

  /** Flood-fill the 4-connected region of (x, y) with the selected class; false if nothing changed. */
  function floodFill(x, y) {
    const { r, mask, classId } = state;
    const from = mask[y * r + x];
    if (from === classId) return false;
    const stack = [y * r + x];
    mask[y * r + x] = classId;
    while (stack.length) {
      const p = stack.pop();
      const px = p % r, py = (p - px) / r;
      const next = [];
      if (px > 0) next.push(p - 1);
      if (px < r - 1) next.push(p + 1);
      if (py > 0) next.push(p - r);
      if (py < r - 1) next.push(p + r);
      for (const q of next) {
        if (mask[q] === from) {
          mask[q] = classId;
          stack.push(q);
        }
      }
    }
    return true;
  }

  // ---------------------------------------------------------------- history

  function remember() {
    state.undo.push(state.mask.slice());
    if (state.undo.length > UNDO_LIMIT) state.undo.shift();
    state.redo = [];
    updateHistoryButtons();
  }

  function forget() {  // an edit that changed nothing
    state.undo.pop();
    updateHistoryButtons();
  }

  function updateHistoryButtons() {
    $("undo").disabled = state.undo.length === 0;
    $("redo").disabled = state.redo.length === 0;
  }

  function undo() {
    if (!state.undo.length) return;
    state.redo.push(state.mask);
    state.mask = state.undo.pop();
    afterEdit("undone");
  }

  function redo() {
    if (!state.redo.length) return;
    state.undo.push(state.mask);
    state.mask = state.redo.pop();
    afterEdit("redone");
  }

  function clearMask() {
    remember();
    state.mask.fill(state.classId);
    afterEdit(`cleared to class ${state.classId}`);
  }

  /** Redraw, refresh the buttons and, with "after every stroke" on, generate. */
  function afterEdit(what) {
    render();
    updateHistoryButtons();
    if (what) status(`mask ${what}`);
    if ($("auto-generate").checked) generate();
  }

  // ---------------------------------------------------------------- pointer and keyboard painting

  function pixelAt(event, clamp) {
    const rect = maskCanvas.getBoundingClientRect();
    let x = Math.floor(((event.clientX - rect.left) / rect.width) * state.r);
    let y = Math.floor(((event.clientY - rect.top) / rect.height) * state.r);
    if (!clamp && (x < 0 || y < 0 || x >= state.r || y >= state.r)) return null;
    x = Math.min(state.r - 1, Math.max(0, x));
    y = Math.min(state.r - 1, Math.max(0, y));
    return { x, y };
  }

  /** Apply the tool at `p` as a new edit: a brush dab (a stroke begins) or a fill. */
  function applyTool(p) {
    remember();
    if (state.tool === "fill") {
      if (!floodFill(p.x, p.y)) {
        forget();
        return;
      }
      afterEdit(`filled from (${p.x}, ${p.y})`);
      return;
    }
    paintLine(p, p);
    state.stroke = p;
    render();
  }

  function endStroke() {
    if (!state.stroke) return;
    state.stroke = null;
    afterEdit("painted");
  }

  function onPointerDown(event) {
    if (event.button !== 0) return;
    event.preventDefault();
    maskCanvas.focus({ preventScroll: true });
    maskCanvas.setPointerCapture(event.pointerId);
    const p = pixelAt(event, true);
    state.cursor = p;
    applyTool(p);
    drawCursor();
  }

  function onPointerMove(event) {
    const p = pixelAt(event, state.stroke !== null);
    state.cursor = p;
    if (state.stroke && p) {
      paintLine(state.stroke, p);
      state.stroke = p;
      render();
    }
    drawCursor();
  }

  function onCanvasKey(event) {
    const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const c = state.cursor || { x: state.r >> 1, y: state.r >> 1 };
    if (event.key in moves) {
      event.preventDefault();
      const [dx, dy] = moves[event.key];
      const next = { x: Math.min(state.r - 1, Math.max(0, c.x + dx)), y: Math.min(state.r - 1, Math.max(0, c.y + dy)) };
      if (event.shiftKey && state.tool === "brush") {
        if (!state.stroke) applyTool(c);
        paintLine(state.stroke, next);
        state.stroke = next;
        render();
      }
      state.cursor = next;
      drawCursor();
    } else if (event.key === " " || event.key === "Enter") {
      event.preventDefault();
      state.cursor = c;
      applyTool(c);
      endStroke();
      drawCursor();
    }
  }

  function onCanvasKeyUp(event) {
    if (event.key === "Shift") endStroke();
  }

  /** Show the tool's footprint at the cursor, in the selected class's colour. */
  function drawCursor() {
    const ctx = cursorCanvas.getContext("2d");
    ctx.clearRect(0, 0, cursorCanvas.width, cursorCanvas.height);
    if (!state.cursor) return;
    const cell = cursorCanvas.width / state.r;
    const { x, y } = state.cursor;
    const offsets = state.tool === "fill" ? [[0, 0]] : brushOffsets(state.size);
    ctx.fillStyle = colourCss(state.classId);
    ctx.globalAlpha = 0.7;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const [dx, dy] of offsets) {
      ctx.fillRect((x + dx) * cell, (y + dy) * cell, cell, cell);
      x0 = Math.min(x0, x + dx); y0 = Math.min(y0, y + dy);
      x1 = Math.max(x1, x + dx + 1); y1 = Math.max(y1, y + dy + 1);
    }
    ctx.globalAlpha = 1;
    ctx.lineWidth = Math.max(1, window.devicePixelRatio || 1);
    ctx.strokeStyle = "rgba(0, 0, 0, 0.8)";
    ctx.strokeRect(x0 * cell, y0 * cell, (x1 - x0) * cell, (y1 - y0) * cell);
    ctx.strokeStyle = "rgba(255, 255, 255, 0.9)";
    ctx.strokeRect(x0 * cell - ctx.lineWidth, y0 * cell - ctx.lineWidth,
      (x1 - x0) * cell + 2 * ctx.lineWidth, (y1 - y0) * cell + 2 * ctx.lineWidth);
  }

  function resizeCursorCanvas() {
    const ratio = window.devicePixelRatio || 1;
    cursorCanvas.width = Math.round(cursorCanvas.clientWidth * ratio);
    cursorCanvas.height = Math.round(cursorCanvas.clientHeight * ratio);
    drawCursor();
  }

  // ---------------------------------------------------------------- tools

  function setTool(tool) {
    state.tool = tool;
    $(`tool-${tool}`).checked = true;
    updateMaskCaption();
    drawCursor();
  }

  function setSize(size) {
    const slider = $("brush-size");
    state.size = Math.min(Number(slider.max), Math.max(1, size));
    slider.value = String(state.size);
    $("brush-size-value").textContent = String(state.size);
    drawCursor();
  }

  // ---------------------------------------------------------------- generation

  function maskRows() {
    const { r, mask } = state;
    const rows = new Array(r);
    for (let y = 0; y < r; y++) rows[y] = Array.from(mask.subarray(y * r, (y + 1) * r));
    return rows;
  }

  /** The seed field as an integer in 0..max_seed, or null (with the error shown). */
  function readSeed() {
    const text = $("seed").value.trim();
    const seed = Number(text);
    if (text === "" || !Number.isInteger(seed) || seed < 0 || seed > state.maxSeed) {
      showError(`the seed must be an integer in 0..${state.maxSeed}; got "${text}"`);
      return null;
    }
    return seed;
  }

  async function generate() {
    if (state.busy) {
      state.queued = true;
      return;
    }
    const seed = readSeed();
    if (seed === null) return;
    state.busy = true;
    $("busy").hidden = false;
    const start = performance.now();
    try {
      const answer = await api("/generate", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ mask: maskRows(), seed }),
      });
      const img = $("result");
      img.src = answer.image;
      await img.decode();
      const ms = Math.round(performance.now() - start);
      state.image = { url: answer.image, seed: answer.seed };
      state.generations += 1;
      img.dataset.generation = String(state.generations);
      img.hidden = false;
      $("result-placeholder").hidden = true;
      $("download-image").disabled = false;
      $("result-caption").textContent = `· seed ${answer.seed} · ${img.naturalWidth}×${img.naturalHeight} · ${ms} ms`;
      clearError();
      status(`generated with seed ${answer.seed} in ${ms} ms`);
    } catch (err) {
      showError(`generation failed: ${err.message}`);
      status("generation failed");
    } finally {
      state.busy = false;
      $("busy").hidden = true;
      if (state.queued) {
        state.queued = false;
        generate();
      }
    }
  }

  function newSeed() {
    $("seed").value = String(Math.floor(Math.random() * (Math.min(state.maxSeed, 999999) + 1)));
    if ($("auto-generate").checked) generate();
  }

  // ---------------------------------------------------------------- samples

  async function loadSample(index) {
    if (!Number.isInteger(index) || index < 0 || index >= state.numExamples) {
      showError(state.numExamples
        ? `sample pairs are numbered 0..${state.numExamples - 1}; got "${$("sample-index").value}"`
        : "this run has no sample pairs (its dataset is not available)");
      return;
    }
    try {
      const answer = await api(`/api/example/${index}`);
      const rows = answer.mask;
      const { r, k } = state;
      if (!Array.isArray(rows) || rows.length !== r || rows.some((row) => !Array.isArray(row) || row.length !== r)) {
        throw new Error(`the sample's mask is not ${r} x ${r}`);
      }
      const mask = new Uint16Array(r * r);
      rows.forEach((row, y) => row.forEach((v, x) => {
        if (!Number.isInteger(v) || v < 0 || v >= k) throw new Error(`the sample's mask has class id ${v}`);
        mask[y * r + x] = v;
      }));
      remember();
      state.mask = mask;
      const img = $("sample-image");
      img.src = answer.image;
      await img.decode();
      $("sample-view").hidden = false;
      $("views").classList.add("with-sample");
      $("sample-index").value = String(index);
      $("sample-caption").textContent = `· pair ${index}, the generator's image`;
      clearError();
      afterEdit(`loaded from sample pair ${index}`);
    } catch (err) {
      showError(`sample pair ${index} could not be loaded: ${err.message}`);
    }
  }

  // ---------------------------------------------------------------- downloads

  function save(blob, name) {
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = name;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 2000);
    status(`saved ${name}`);
  }

  function fileStem() {
    return (state.run || "uscs").replace(/[^A-Za-z0-9._-]+/g, "_");
  }

  function downloadMask() {
    maskCanvas.toBlob((blob) => save(blob, `${fileStem()}-mask.png`), "image/png");
  }

  function downloadIds() {
    const { r, mask } = state;
    const canvas = document.createElement("canvas");
    canvas.width = r;
    canvas.height = r;
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(r, r);
    for (let p = 0; p < r * r; p++) {
      image.data.fill(mask[p], 4 * p, 4 * p + 3);
      image.data[4 * p + 3] = 255;
    }
    ctx.putImageData(image, 0, 0);
    canvas.toBlob((blob) => save(blob, `${fileStem()}-mask-ids.png`), "image/png");
  }

  function downloadJson() {
    const seed = readSeed();
    if (seed === null) return;
    const body = JSON.stringify({ mask: maskRows(), seed });
    save(new Blob([body], { type: "application/json" }), `${fileStem()}-mask.json`);
  }

  function downloadImage() {
    if (!state.image) return;
    const bytes = atob(state.image.url.slice(state.image.url.indexOf(",") + 1));
    const data = new Uint8Array(bytes.length);
    for (let i = 0; i < bytes.length; i++) data[i] = bytes.charCodeAt(i);
    save(new Blob([data], { type: "image/png" }), `${fileStem()}-seed${state.image.seed}.png`);
  }

  // ---------------------------------------------------------------- shortcuts

  function isTextField(target) {
    return target instanceof HTMLInputElement && ["text", "number", "search"].includes(target.type);
  }

  function onKey(event) {
    const mod = event.ctrlKey || event.metaKey;
    if (mod && event.key === "Enter") {
      event.preventDefault();
      generate();
      return;
    }
    if (isTextField(event.target)) return;  // typing a name or a number
    const key = event.key.toLowerCase();
    if (mod && !event.altKey) {
      if (key === "z") {
        event.preventDefault();
        if (event.shiftKey) redo(); else undo();
      } else if (key === "y") {
        event.preventDefault();
        redo();
      }
      return;
    }
    if (event.altKey) return;
    if (/^[0-9]$/.test(key)) {
      const i = (Number(key) + 9) % 10;
      if (i < state.k) selectClass(i);
    } else if (key === "b") setTool("brush");
    else if (key === "f") setTool("fill");
    else if (key === "[") setSize(state.size - 1);
    else if (key === "]") setSize(state.size + 1);
    else if (key === "g") generate();
    else if (key === "n") newSeed();
  }

  // ---------------------------------------------------------------- start

  function bind() {
    maskCanvas.addEventListener("pointerdown", onPointerDown);
    maskCanvas.addEventListener("pointermove", onPointerMove);
    maskCanvas.addEventListener("pointerup", endStroke);
    maskCanvas.addEventListener("pointercancel", endStroke);
    maskCanvas.addEventListener("pointerleave", () => {
      if (!state.stroke) {
        state.cursor = null;
        drawCursor();
      }
    });
    maskCanvas.addEventListener("keydown", onCanvasKey);
    maskCanvas.addEventListener("keyup", onCanvasKeyUp);
    maskCanvas.addEventListener("blur", endStroke);
    document.addEventListener("keydown", onKey);
    new ResizeObserver(resizeCursorCanvas).observe(cursorCanvas);

    for (const tool of ["brush", "fill"]) $(`tool-${tool}`).addEventListener("change", () => setTool(tool));
    $("brush-size").addEventListener("input", () => setSize(Number($("brush-size").value)));
    $("undo").addEventListener("click", undo);
    $("redo").addEventListener("click", redo);
    $("clear").addEventListener("click", clearMask);
    $("generate").addEventListener("click", generate);
    $("new-seed").addEventListener("click", newSeed);
    $("load-sample").addEventListener("click", () => loadSample(Number($("sample-index").value)));
    $("random-sample").addEventListener("click", () => loadSample(Math.floor(Math.random() * state.numExamples)));
    $("download-mask").addEventListener("click", downloadMask);
    $("download-ids").addEventListener("click", downloadIds);
    $("download-json").addEventListener("click", downloadJson);
    $("download-image").addEventListener("click", downloadImage);
    $("error-close").addEventListener("click", clearError);
  }

  async function start() {
    maskCanvas = $("mask");
    cursorCanvas = $("cursor");
    maskContext = maskCanvas.getContext("2d");
    let info;
    try {
      info = await api("/api/info");
    } catch (err) {
      showError(`cannot load the model's description: ${err.message}`);
      return;
    }
    Object.assign(state, {
      run: info.run, k: info.num_classes, r: info.resolution, maxSeed: info.max_seed,
      numExamples: info.num_examples, colours: Uint8Array.from(info.palette.flat()),
    });
    state.names = loadNames(info.class_names);
    state.mask = new Uint16Array(state.r * state.r);
    maskCanvas.width = state.r;
    maskCanvas.height = state.r;

    document.title = `USCS painting · ${state.run}`;
    $("run-name").textContent = state.run;
    $("run-facts").textContent = `${state.k} classes · ${state.r} × ${state.r} px · ` +
      `${state.numExamples} sample pair${state.numExamples === 1 ? "" : "s"}`;
    $("seed").max = String(state.maxSeed);
    const slider = $("brush-size");
    slider.max = String(Math.max(4, Math.min(64, Math.round(state.r / 3))));
    $("sample-index").max = String(Math.max(0, state.numExamples - 1));
    for (const id of ["sample-index", "load-sample", "random-sample"]) $(id).disabled = state.numExamples === 0;
    if (state.numExamples === 0) $("sample-hint").textContent = "This run's dataset is not available.";
    $("download-ids").disabled = state.k > 256;

    buildPalette();
    bind();
    selectClass(0);
    setTool("brush");
    setSize(Math.max(1, Math.round(state.r / 12)));
    render();
    updateHistoryButtons();
    resizeCursorCanvas();
    document.body.dataset.ready = "true";
    status("paint with the mouse (or focus the mask and use the arrow keys), then press Generate");
  }

  document.addEventListener("DOMContentLoaded", start);
})();
