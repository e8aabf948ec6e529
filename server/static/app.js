// segstream viewer: stream list, add/remove form, live tiles, browser camera upstream.
// Plain script, no build step. Speaks websocket protocol v1 (see README).
"use strict";

const TOKEN_KEY = "segstream.token";
const POLL_MS = 2000;
const MAX_BACKOFF_MS = 8000;
const CAMERA_SIZE = { width: 640, height: 480 };

const state = {
  models: new Map(),       // name -> model info (classes, colours)
  streams: new Map(),      // id -> stream info from /api/streams
  tiles: new Map(),        // id -> Tile
  closedByUser: new Set(), // ids whose tile the user closed: do not reopen automatically
  camera: null,            // CameraUplink while the browser camera streams
  defaultModel: null,
};

const $ = (sel, root = document) => root.querySelector(sel);

// Same order as the server's palette (pipeline/render.py), used until /api/models answers.
const FALLBACK_COLOURS = ["#000000", "#ff4081", "#00c8ff", "#ffc400", "#78dc50", "#aa6eff",
  "#ff7828", "#00a08c", "#f0f05a", "#5a78ff", "#ff5a5a"];

// ---------------------------------------------------------------- auth + fetch

const TERMINAL = new Set(["failed", "stopped", "removed"]);

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

let tokenPrompt = null;
function askToken() {
  // One prompt at a time; every caller waits for the same answer.
  if (tokenPrompt) return tokenPrompt;
  tokenPrompt = new Promise((resolve) => {
    const dlg = $("#token-dialog");
    const input = $("#token-input");
    const wrong = $("#token-wrong");
    if (wrong) wrong.hidden = !token();  // a token was sent and refused
    input.value = token();
    dlg.addEventListener("close", () => {
      if (input.value) sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      $("#token-btn").hidden = false;
      tokenPrompt = null;
      resolve();
    }, { once: true });
    dlg.showModal();
    input.focus();
  });
  return tokenPrompt;
}

async function api(path, options = {}, retry = true) {
  const headers = new Headers(options.headers || {});
  if (token()) headers.set("Authorization", `Bearer ${token()}`);
  if (options.body && !headers.has("Content-Type")) headers.set("Content-Type", "application/json");
  const res = await fetch(path, { ...options, headers });
  if (res.status === 401 && retry) {
    await askToken();
    const again = await api(path, options, false);
    if (again.ok && !state.models.size && path !== "/api/models") loadModels();
    return again;
  }
  return res;
}

async function errorText(res) {
  try {
    const body = await res.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) {
      return body.detail.map((d) => `${(d.loc || []).slice(1).join(".") || "body"}: ${d.msg}`).join("; ");
    }
    return JSON.stringify(body);
  } catch {
    return `${res.status} ${res.statusText}`;
  }
}

// An address of this server with the token in its query: for links and <img> tags, which
// cannot send an Authorization header.
function httpUrl(path, params = {}) {
  const url = new URL(path, location.href);
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null) url.searchParams.set(k, v);
  if (token()) url.searchParams.set("token", token());
  return url.toString();
}

function wsUrl(path, params = {}) {
  const url = new URL(httpUrl(path, params));
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return url.toString();
}

// ---------------------------------------------------------------- protocol v1

const utf8 = new TextDecoder();

function unpack(buffer) {
  const view = new DataView(buffer);
  const n = view.getUint32(0, false);
  const header = JSON.parse(utf8.decode(new Uint8Array(buffer, 4, n)));
  return { header, payload: new Uint8Array(buffer, 4 + n) };
}

function hexToRgb(hex) {
  const v = parseInt(hex.slice(1), 16);
  return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
}

// ---------------------------------------------------------------- a live tile

class Tile {
  constructor(id) {
    this.id = id;
    this.el = $("#tile-template").content.firstElementChild.cloneNode(true);
    this.el.dataset.stream = id;
    this.canvas = $("canvas.view", this.el);
    this.ctx = this.canvas.getContext("2d");
    this.maskCanvas = document.createElement("canvas");
    this.maskCtx = this.maskCanvas.getContext("2d", { willReadFrequently: true });
    this.mode = "overlay";
    this.opacity = 0.55;
    this.ws = null;
    this.backoff = 500;
    this.timer = null;
    this.closed = false;
    this.busy = false;       // a message is being decoded/drawn
    this.pending = null;     // newest message waiting for the decoder (latest wins)
    this.arrivals = [];      // receive times for the fps readout
    this.classes = [];
    this.classKey = "";
    this.palette = null;     // Uint32Array, RGBA little-endian per class
    this.frame = null;       // last decoded frame bitmap
    this.received = 0;

    $(".tile-title", this.el).textContent = id;
    const base = `/api/streams/${encodeURIComponent(id)}`;
    $(".links .snapshot", this.el).href = httpUrl(`${base}/snapshot`);
    $(".links .mjpeg", this.el).href = httpUrl(`${base}/mjpeg`);
    $(".close", this.el).addEventListener("click", () => {
      state.closedByUser.add(id);
      closeTile(id);
    });
    for (const b of this.el.querySelectorAll(".segmented button")) {
      b.addEventListener("click", () => {
        this.mode = b.dataset.mode;
        for (const o of this.el.querySelectorAll(".segmented button")) o.classList.toggle("on", o === b);
        // Opacity only means something while the mask is drawn over the picture.
        $(".opacity input", this.el).disabled = this.mode !== "overlay";
        this.redraw();
      });
    }
    $(".opacity input", this.el).addEventListener("input", (e) => {
      this.opacity = Number(e.target.value) / 100;
      this.redraw();
    });
    this.connect();
  }

  setState(text) {
    this.state = text;
    const badge = $(".badge.state", this.el);
    badge.textContent = text;
    badge.className = `badge state ${text}`;
  }

  note(text) {
    const n = $(".stage-note", this.el);
    n.textContent = text || "";
    n.hidden = !text;
  }

  connect() {
    if (this.closed) return;
    this.setState("connecting");
    const ws = new WebSocket(wsUrl(`/ws/streams/${encodeURIComponent(this.id)}`, { format: "layers", quality: 80 }));
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => { this.backoff = 500; };
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") return; // settings acknowledgements and errors
      this.received += 1;
      if (this.busy) { this.pending = ev.data; return; }
      this.handle(ev.data);
    };
    ws.onclose = (ev) => this.onClose(ev);
  }

  async onClose(ev) {
    this.ws = null;
    if (this.closed) return;
    if (ev.code === 4404 || ev.code === 4410) {
      this.setState("removed");
      this.note(ev.reason || "stream removed");
      setTimeout(() => closeTile(this.id), 1500);
      return;
    }
    if (ev.code === 4401) {
      this.note("token required");
      await askToken();
      this.connect();
      return;
    }
    this.setState("reconnecting");
    this.note(`disconnected (${ev.code}${ev.reason ? `: ${ev.reason}` : ""}); retrying…`);
    const delay = this.backoff * (0.8 + 0.4 * Math.random());
    this.backoff = Math.min(MAX_BACKOFF_MS, this.backoff * 2);
    this.timer = setTimeout(() => this.connect(), delay);
  }

  async handle(buffer) {
    this.busy = true;
    try {
      const { header, payload } = unpack(buffer);
      if (header.type === "status") {
        this.setState(header.state);
        this.note(header.stale ? `${header.state}${header.error ? `: ${header.error}` : ""}` : "");
        this.setClasses(header.classes);
      } else if (header.type === "result") {
        await this.draw(header, payload);
      }
    } catch (err) {
      console.warn(`tile ${this.id}:`, err);
    } finally {
      this.busy = false;
      if (this.pending) {
        const next = this.pending;
        this.pending = null;
        this.handle(next);
      }
    }
  }

  setClasses(classes) {
    if (!classes || !classes.length) return;
    const info = state.streams.get(this.id);
    const model = info && state.models.get(info.model);
    const colours = (model && model.colours) || FALLBACK_COLOURS;
    const key = classes.join() + "|" + colours.join();
    if (key === this.classKey) return;
    this.classKey = key;
    this.classes = classes;
    const rgba = new Uint32Array(256);
    const legend = $(".legend", this.el);
    legend.replaceChildren();
    classes.forEach((name, i) => {
      const hex = colours[i] || "#ffffff";
      if (i > 0) {
        const [r, g, b] = hexToRgb(hex);
        rgba[i] = (255 << 24) | (b << 16) | (g << 8) | r; // little-endian RGBA in a Uint32
        const li = document.createElement("li");
        li.innerHTML = `<i style="background:${hex}"></i>`;
        li.append(name);
        legend.append(li);
      }
    });
    for (let i = classes.length; i < 256; i++) rgba[i] = 0xffffffff;
    this.palette = rgba;
  }

  async draw(header, payload) {
    const t = Date.now() / 1000;
    // The last results of a stream that ended can arrive after its final status message:
    // they are drawn, but do not turn a failed or stopped stream back into a streaming one.
    if (!TERMINAL.has(this.state)) {
      this.setState("streaming");
      this.note("");
    }
    this.setClasses(header.classes);
    const sizes = header.layers;
    const jpeg = new Blob([payload.subarray(0, sizes.image)], { type: "image/jpeg" });
    const png = new Blob([payload.subarray(sizes.image)], { type: "image/png" });
    const opts = { colorSpaceConversion: "none", premultiplyAlpha: "none" };
    const [frame, labels] = await Promise.all([createImageBitmap(jpeg), createImageBitmap(png, opts)]);
    this.paintMask(labels);
    labels.close();
    if (this.frame) this.frame.close();
    this.frame = frame;
    this.redraw();
    this.readouts(header, t);
  }

  paintMask(labels) {
    const { width, height } = labels;
    if (this.maskCanvas.width !== width || this.maskCanvas.height !== height) {
      this.maskCanvas.width = width;
      this.maskCanvas.height = height;
    }
    this.maskCtx.clearRect(0, 0, width, height);
    this.maskCtx.drawImage(labels, 0, 0);
    const img = this.maskCtx.getImageData(0, 0, width, height);
    const px = new Uint32Array(img.data.buffer);
    const pal = this.palette || new Uint32Array(256).fill(0xff8140ff, 1);
    for (let i = 0; i < px.length; i++) px[i] = pal[px[i] & 255]; // red channel = class index
    this.maskCtx.putImageData(img, 0, 0);
  }

  redraw() {
    const f = this.frame;
    if (!f) return;
    if (this.canvas.width !== f.width || this.canvas.height !== f.height) {
      this.canvas.width = f.width;
      this.canvas.height = f.height;
      $(".stage", this.el).style.aspectRatio = `${f.width} / ${f.height}`;
    }
    const c = this.ctx;
    c.globalAlpha = 1;
    if (this.mode === "mask") {
      c.fillStyle = "#000";
      c.fillRect(0, 0, f.width, f.height);
      c.drawImage(this.maskCanvas, 0, 0);
      return;
    }
    c.drawImage(f, 0, 0);
    if (this.mode === "overlay") {
      c.globalAlpha = this.opacity;
      c.drawImage(this.maskCanvas, 0, 0);
      c.globalAlpha = 1;
    }
  }

  readouts(header, t) {
    this.arrivals.push(t);
    while (this.arrivals.length && t - this.arrivals[0] > 2) this.arrivals.shift();
    const n = this.arrivals.length;
    const fps = n >= 2 ? (n - 1) / Math.max(1e-3, this.arrivals[n - 1] - this.arrivals[0]) : 0;
    const fpsEl = $(".r-fps", this.el);
    fpsEl.textContent = fps.toFixed(1);
    fpsEl.dataset.fps = fps.toFixed(2);
    // End to end: capture on the server until drawn here (assumes roughly synchronised clocks).
    const e2e = (Date.now() / 1000 - header.captured_at) * 1000;
    const server = header.latency_ms && header.latency_ms.total;
    const lat = $(".r-latency", this.el);
    lat.textContent = `${Math.max(0, e2e).toFixed(0)} ms`;
    lat.title = `server side (capture → send): ${server != null ? server.toFixed(1) : "?"} ms\n` +
      Object.entries(header.latency_ms || {}).map(([k, v]) => `${k}: ${v} ms`).join("\n");
    const info = state.streams.get(this.id);
    if (info && info.kind === "push" && header.pts) {
      // Camera frames carry the browser's own capture time as pts: a true round trip.
      this.el.querySelector(".rtt").hidden = false;
      $(".r-rtt", this.el).textContent = `${((Date.now() / 1000 - header.pts) * 1000).toFixed(0)} ms`;
    }
    const dropped = header.dropped || {};
    const total = Object.values(dropped).reduce((a, b) => a + b, 0);
    const drops = $(".r-drops", this.el);
    drops.textContent = String(total);
    drops.title = Object.entries(dropped).map(([k, v]) => `${k}: ${v}`).join("\n");
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000, "viewer closed");
    if (this.frame) this.frame.close();
    this.el.remove();
  }
}

function openTile(id) {
  if (state.tiles.has(id)) return state.tiles.get(id);
  state.closedByUser.delete(id);
  const tile = new Tile(id);
  state.tiles.set(id, tile);
  $("#tiles").append(tile.el);
  $("#tiles-empty").hidden = true;
  renderList();
  return tile;
}

function closeTile(id) {
  const tile = state.tiles.get(id);
  if (!tile) return;
  tile.close();
  state.tiles.delete(id);
  $("#tiles-empty").hidden = state.tiles.size > 0;
  renderList();
}

// ---------------------------------------------------------------- stream list

function renderList() {
  const list = $("#stream-list");
  list.replaceChildren();
  for (const s of state.streams.values()) {
    const li = document.createElement("li");
    li.className = "stream-item" + (state.tiles.has(s.id) ? " watching" : "");
    li.dataset.stream = s.id;
    li.title = "Show or hide this stream";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = s.id;
    const badge = document.createElement("span");
    badge.className = `badge ${s.state}`;
    badge.textContent = s.state;
    const remove = document.createElement("button");
    remove.className = "icon remove";
    remove.type = "button";
    remove.title = `Remove stream ${s.id}`;
    remove.setAttribute("aria-label", `Remove stream ${s.id}`);
    remove.textContent = "×";
    remove.addEventListener("click", (e) => { e.stopPropagation(); removeStream(s.id); });
    const src = document.createElement("span");
    src.className = "src";
    src.textContent = `${s.source} · ${s.model} · ${s.fps.toFixed(1)} fps · ${s.clients} watching`;
    li.append(name, badge, remove, src);
    li.addEventListener("click", () => {
      if (state.tiles.has(s.id)) { state.closedByUser.add(s.id); closeTile(s.id); } else openTile(s.id);
    });
    list.append(li);
  }
  $("#stream-empty").hidden = state.streams.size > 0;
}

async function refreshStreams() {
  try {
    const res = await api("/api/streams");
    if (!res.ok) return;
    const streams = await res.json();
    const seen = new Set();
    for (const s of streams) {
      seen.add(s.id);
      const isNew = !state.streams.has(s.id);
      state.streams.set(s.id, s);
      // Show new streams automatically, a few at a time.
      if (isNew && !state.closedByUser.has(s.id) && state.tiles.size < 4) openTile(s.id);
    }
    for (const id of [...state.streams.keys()]) {
      if (!seen.has(id)) {
        state.streams.delete(id);
        closeTile(id);
      }
    }
    renderList();
    if (state.unreachable) {
      state.unreachable = false;
      $("#server-info").textContent = "";
    }
  } catch (err) {
    state.unreachable = true;
    $("#server-info").textContent = "server unreachable; retrying…";
  }
}

async function removeStream(id) {
  // Removing stops the stream on the server, for every viewer and client, not just here.
  if (!confirm(`Remove stream ${id}? It stops for every viewer and websocket client.`)) return;
  let res;
  try {
    res = await api(`/api/streams/${encodeURIComponent(id)}`, { method: "DELETE" });
  } catch (err) {
    alert(`Could not remove ${id}: the server cannot be reached (${err.message || err})`);
    return;
  }
  if (!res.ok && res.status !== 404) {
    alert(`Could not remove ${id}: ${await errorText(res)}`);
    return;
  }
  if (state.camera && state.camera.streamId === id) state.camera.stop();
  state.streams.delete(id);
  closeTile(id);
  refreshStreams();
}

// What picking a model implies when its weights are not on the server yet.
function weightsHint(w) {
  if (!w || w.present) return "";
  if (w.source === "url") return "Its weights are downloaded on first use: the stream waits for them.";
  if (w.source === "none") return "Untrained (no weights): its masks are meaningless.";
  return `Its weights file is missing: ${w.location}`;
}

function showModelHint() {
  const m = state.models.get($("#add-model").value);
  const hint = $("#model-hint");
  hint.textContent = m ? weightsHint(m.weights) : "";
  hint.hidden = !hint.textContent;
}

async function loadModels() {
  const res = await api("/api/models");
  if (!res.ok) return;
  const models = await res.json();
  const select = $("#add-model");
  select.replaceChildren();
  for (const m of models) {
    state.models.set(m.name, m);
    const opt = document.createElement("option");
    opt.value = m.name;
    const hint = weightsHint(m.weights);
    opt.textContent = `${m.name}${m.default ? " (default)" : ""}${hint ? " *" : ""}`;
    opt.title = [m.description, hint].filter(Boolean).join(" ");
    opt.selected = m.default;
    if (m.default) state.defaultModel = m.name;
    select.append(opt);
  }
  showModelHint();
}

function setupForm() {
  const form = $("#add-form");
  $("#add-model").addEventListener("change", showModelHint);
  // The browser's own checks (an empty source) stop the submit before it runs: clear an
  // earlier server error then, so the two messages do not contradict each other.
  form.addEventListener("invalid", () => { $("#add-error").hidden = true; }, true);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const err = $("#add-error");
    err.hidden = true;
    const body = { source: $("#add-source").value.trim(), model: $("#add-model").value || null };
    const id = $("#add-id").value.trim();
    if (id) body.id = id;
    $("#add-submit").disabled = true;
    try {
      const res = await api("/api/streams", { method: "POST", body: JSON.stringify(body) });
      if (!res.ok) {
        err.textContent = await errorText(res);
        err.hidden = false;
        return;
      }
      const info = await res.json();
      state.streams.set(info.id, info);
      form.reset();
      loadModelsSelection();
      openTile(info.id);
    } catch (e) {
      err.textContent = `the server cannot be reached (${e.message || e})`;
      err.hidden = false;
    } finally {
      $("#add-submit").disabled = false;
    }
  });
}

function loadModelsSelection() {
  if (state.defaultModel) $("#add-model").value = state.defaultModel;
  showModelHint();
}

// ---------------------------------------------------------------- browser camera upstream

class CameraUplink {
  // Sends one JPEG at a time and waits for the server's ack before the next, so frames
  // never queue in the browser or the network: the rate adapts to what the server keeps up with.
  constructor() {
    this.streamId = null;
    this.ws = null;
    this.stream = null;
    this.stopped = false;
    this.canvas = document.createElement("canvas");
  }

  async start() {
    this.stream = await navigator.mediaDevices.getUserMedia({ video: CAMERA_SIZE, audio: false });
    if (this.stopped) {  // stopped while the browser was still opening the camera
      for (const t of this.stream.getTracks()) t.stop();
      return;
    }
    const video = $("#camera-video");
    video.srcObject = this.stream;
    await video.play();
    if (this.stopped) {
      for (const t of this.stream.getTracks()) t.stop();
      return;
    }
    this.video = video;
    const model = $("#add-model").value || undefined;
    const ws = new WebSocket(wsUrl("/ws/ingest", { model }));
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onmessage = (ev) => {
      const msg = JSON.parse(ev.data);
      if (msg.type === "ready") {
        this.streamId = msg.stream;
        refreshStreams().then(() => openTile(msg.stream));
        this.sendFrame();
      } else if (msg.type === "ack") {
        this.sendFrame();
      } else if (msg.type === "error") {
        console.warn("camera:", msg.error);
      }
    };
    ws.onclose = (ev) => {
      if (!this.stopped && ev.code === 4401) askToken();
      if (!this.stopped && ev.code !== 1000) $("#server-info").textContent = `camera stream closed: ${ev.reason || ev.code}`;
      this.stop();
    };
  }

  async sendFrame() {
    if (this.stopped || !this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    const v = this.video;
    const w = v.videoWidth || CAMERA_SIZE.width;
    const h = v.videoHeight || CAMERA_SIZE.height;
    if (this.canvas.width !== w) { this.canvas.width = w; this.canvas.height = h; }
    const ctx = this.canvas.getContext("2d");
    ctx.drawImage(v, 0, 0, w, h);
    const capturedAt = Date.now() / 1000;
    const blob = await new Promise((r) => this.canvas.toBlob(r, "image/jpeg", 0.8));
    if (!blob || this.stopped) return;
    const header = new TextEncoder().encode(JSON.stringify({ t: capturedAt }));
    const msg = new Uint8Array(4 + header.length + blob.size);
    new DataView(msg.buffer).setUint32(0, header.length, false);
    msg.set(header, 4);
    msg.set(new Uint8Array(await blob.arrayBuffer()), 4 + header.length);
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(msg);
  }

  stop() {
    if (this.stopped) return;
    this.stopped = true;
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "camera off");
    if (this.stream) for (const t of this.stream.getTracks()) t.stop();
    state.camera = null;
    const btn = $("#camera-btn");
    btn.textContent = "Use my camera";
    btn.classList.remove("live");
    setTimeout(refreshStreams, 300);
  }
}

function setupCamera() {
  const btn = $("#camera-btn");
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    btn.disabled = true;
    btn.title = "Camera access needs a secure context (https or localhost)";
    return;
  }
  btn.addEventListener("click", async () => {
    if (state.camera) { state.camera.stop(); return; }
    const cam = new CameraUplink();
    state.camera = cam;
    if ($("#server-info").textContent.startsWith("camera")) $("#server-info").textContent = "";
    btn.textContent = "Stop camera";
    btn.classList.add("live");
    try {
      await cam.start();
    } catch (err) {
      $("#server-info").textContent = `camera unavailable: ${err.message || err}`;
      cam.stop();
    }
  });
}

// ---------------------------------------------------------------- start

async function main() {
  $("#token-btn").addEventListener("click", () => askToken().then(() => location.reload()));
  if (token()) $("#token-btn").hidden = false;
  setupForm();
  setupCamera();
  await loadModels();
  await refreshStreams();
  setInterval(refreshStreams, POLL_MS);
  window.addEventListener("beforeunload", () => { if (state.camera) state.camera.stop(); });
}

main();
