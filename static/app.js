// The web page of the Qwen3-TTS server: speak with any voice while the audio streams, clone and design voices, and
// watch the server's state. Plain JavaScript, no build step, no third-party code; it uses only the server's public
// API (README.md "Endpoints"), with paths relative to the page so that it also works behind a proxy's sub-path.
"use strict";

const HEALTH_POLL_MS = 2000;       // how often the server box is refreshed while the page is visible
const PLAYBACK_LEAD_S = 0.1;       // the first chunk starts this far ahead of now, so it starts whole
const MAX_LEAD_S = 3;              // after each gap (audio came slower than it plays) the lead doubles, up to this
const KEY_STORAGE = "qwen3-tts-api-key";

const $ = (selector, root = document) => root.querySelector(selector);
const make = (tag, properties = {}) => Object.assign(document.createElement(tag), properties);

// Rebuilds a menu's options, keeping the choice when it is still there.
function refill(select, options) {
  const chosen = select.value;
  select.replaceChildren(...options);
  select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "";
}

// ---- API calls: every one sends the key (when there is one) and turns an error answer into the API's own message

class ApiFailure extends Error {}

const apiKey = {
  get: () => sessionStorage.getItem(KEY_STORAGE) || "",
  set: (key) => sessionStorage.setItem(KEY_STORAGE, key),
};

// fetch() of an API path; `json` becomes the body. Resolves with the response when it is 2xx, else rejects with
// an ApiFailure carrying the server's message ({"error": {"message"}}); a 401 also opens the key prompt.
async function api(path, { json, ...options } = {}) {
  const headers = new Headers(options.headers);
  if (apiKey.get()) headers.set("Authorization", `Bearer ${apiKey.get()}`);
  if (json !== undefined) {
    headers.set("Content-Type", "application/json");
    options.body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiFailure(`the server cannot be reached (${err.message})`);
  }
  if (response.ok) return response;
  const message = await errorMessage(response);
  if (response.status === 401) keyPrompt.show(message);
  throw new ApiFailure(message);
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const message = (body.error && body.error.message) || body.detail;
    if (message) return message;
  } catch (_) { /* not JSON: fall through to the raw text */ }
  return `${response.status} ${response.statusText}${text ? `: ${text.slice(0, 200)}` : ""}`;
}

async function apiJson(path, options) {
  return (await api(path, options)).json();
}

function showError(element, err) {
  element.textContent = err ? err.message : "";
  element.hidden = !err;
}

// ---- the API-key prompt

const keyPrompt = {
  show(message) {
    const section = $("#key-section");
    $("#key-message").textContent = apiKey.get() ? `The key was refused: ${message}` : message;
    if (section.hidden) {
      section.hidden = false;
      $("#api-key").focus();
    }
  },
  init() {
    $("#key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      apiKey.set($("#api-key").value.trim());
      $("#key-section").hidden = true;
      loadLists();
    });
  },
};

// ---- server state, from /health (open without a key)

const MODEL_STATES = {          // /health's model_state -> the header's summary
  ready: "model ready",
  loading: "model loading…",
  unloaded: "model unloaded (loads on the next request)",
  failed: "model failed to load",
};

function describeHealth(h) {
  const facts = [
    ["status", h.status],
    ["model", h.model_id],
    ["model state", h.model_state + (h.model_error ? `: ${h.model_error}` : "")],
    ["queue", `${h.queue_depth} of ${h.max_queue_depth || "unlimited"}${h.busy ? " (generating)" : ""}`],
    ["device", `${h.device || "–"} ${h.dtype || ""}`],
    ["audio cache", `${h.audio_cache_size} of ${h.audio_cache_max} (${h.audio_cache_hits} hits)`],
    ["version", h.version],
  ];
  if (h.gpu_name) {
    facts.splice(5, 0, ["GPU", `${h.gpu_name}: ${h.gpu_allocated_mb} MB allocated, ${h.gpu_reserved_mb} MB reserved`]);
  }
  return facts;
}

function renderHealth(h) {
  const summary = $("#server-summary");
  summary.dataset.state = h.model_state;
  summary.textContent = (MODEL_STATES[h.model_state] || `model ${h.model_state}`) +
    (h.queue_depth ? `, ${h.queue_depth} in queue` : "");
  const problem = h.model_error ? `The model cannot be used: ${h.model_error}` : "";
  if ($("#model-error").textContent !== problem) {          // an alert: announced when it changes, not every poll
    $("#model-error").textContent = problem;
    $("#model-error").hidden = !problem;
  }
  $("#server-state").replaceChildren(...describeHealth(h).map(([name, value]) => {
    const row = make("div");
    row.append(make("dt", { textContent: name }), make("dd", { textContent: value }));
    return row;
  }));
  $("#model-states tbody").replaceChildren(...(h.models || []).map((m) => {
    const row = make("tr");
    row.append(make("td", { textContent: m.role }), make("td", { textContent: m.model_id, className: "path" }),
               make("td", { textContent: m.state + (m.error ? `: ${m.error}` : "") }));
    return row;
  }));
  const design = (h.models || []).find((m) => m.role === "voice_design");
  $("#design-model-state").textContent = design
    ? `${design.model_id}, ${design.state}${design.error ? `: ${design.error}` : " (loaded when first used)"}`
    : "not configured";
}

async function refreshHealth() {
  try {
    renderHealth(await apiJson("health"));
  } catch (err) {
    const summary = $("#server-summary");
    summary.dataset.state = "unreachable";
    summary.textContent = `server unreachable: ${err.message}`;
  }
}

async function pollHealth() {
  await refreshHealth();
  setTimeout(pollHealth, HEALTH_POLL_MS * (document.hidden ? 5 : 1));
}

// ---- voices and consents

const VOICE_GROUPS = [        // the listing's `kind` -> a group of the voice menu, in this order
  ["custom", "Your voices"],
  ["builtin", "Qwen3-TTS speakers"],
  ["openai_alias", "OpenAI voice names"],
];

function voiceLabel(v) {
  if (v.kind === "custom") return `${v.name} (${v.type === "prompt" ? "designed" : "cloned"})`;
  return v.description ? `${v.name}: ${v.description}` : v.name;
}

function renderVoiceMenu(voices) {
  const groups = VOICE_GROUPS.map(([kind, title]) => {
    const group = make("optgroup", { label: title });
    for (const v of voices.filter((voice) => voice.kind === kind)) {
      const option = new Option(voiceLabel(v), v.id);
      option.dataset.kind = v.kind;
      group.append(option);
    }
    return group;
  }).filter((group) => group.children.length);
  refill($("#voice"), [new Option("server default", ""), ...groups]);
}

function renderVoiceTable(custom) {
  $("#voice-list-empty").hidden = custom.length > 0;
  $("#voice-list").hidden = custom.length === 0;
  $("#voice-list tbody").replaceChildren(...custom.map((v) => {
    const row = make("tr");
    row.dataset.voiceId = v.id;
    const from = v.type === "prompt" ? `description: ${v.description || ""}` : "a sample";
    for (const text of [v.name, from, v.language || "–"]) row.append(make("td", { textContent: text }));
    const use = make("button", { type: "button", textContent: "Use", onclick: () => chooseVoice(v.id) });
    use.setAttribute("aria-label", `Use ${v.name}`);
    const remove = make("button", { type: "button", textContent: "Delete", onclick: () => deleteVoice(v) });
    remove.setAttribute("aria-label", `Delete ${v.name}`);
    const buttons = make("div", { className: "row" });
    const actions = make("td");
    buttons.append(use, remove);
    actions.append(buttons);
    row.append(actions);
    return row;
  }));
}

function chooseVoice(id) {
  $("#voice").value = id;
  $("#speak").focus();
}

async function loadVoices() {
  const { voices } = await apiJson("v1/audio/voices");
  renderVoiceMenu(voices);
  renderVoiceTable(voices.filter((v) => v.kind === "custom"));
}

async function loadConsents() {
  const { data } = await apiJson("v1/audio/voice_consents?limit=100");
  refill($("#consent-choice"), [new Option("a new recording (below)", ""),
                                 ...data.map((c) => new Option(`${c.name} (${c.language})`, c.id))]);
  $("#new-consent").hidden = $("#consent-choice").value !== "";
}

async function loadLists() {
  try {
    await Promise.all([loadVoices(), loadConsents()]);
    showError($("#voices-error"), null);
  } catch (err) {
    showError($("#voices-error"), err);
  }
  document.body.dataset.ready = "true";
}

async function deleteVoice(v) {
  if (!confirm(`Delete the voice ${v.name}? Its files are removed from the server.`)) return;
  try {
    await api(`v1/audio/voices/${encodeURIComponent(v.id)}`, { method: "DELETE" });
    showError($("#voices-error"), null);
  } catch (err) {
    showError($("#voices-error"), err);
  }
  await loadLists();
}

// ---- streamed speech: SSE events of base64 s16le PCM -> Web Audio, the waveform, the timings

// The request as the form says. The seed is always sent (a random one when the field is empty) so that a download
// in another format is the same audio as what was heard.
function speechRequest() {
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  const voice = $("#voice").selectedOptions[0];
  return {
    input: $("#text").value,
    voice: !voice || voice.value === "" ? undefined
      : voice.dataset.kind === "custom" ? { id: voice.value } : voice.value,     // custom voices go by id
    language: $("#language").value || undefined,
    instructions: $("#instructions").value.trim() || undefined,
    speed: Number($("#speed").value),
    temperature: number("#temperature"),
    top_p: number("#top-p"),
    seed: number("#seed") ?? Math.floor(Math.random() * 2 ** 31),
    sample_rate: number("#sample-rate"),
  };
}

// Server-sent events from a fetch() body: yields each event's data (the text after "data: ").
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    pending += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = pending.indexOf("\n\n")) >= 0) {
      const lines = pending.slice(0, end).split("\n");
      pending = pending.slice(end + 2);
      const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

// base64 of s16le mono PCM -> float samples in [-1, 1]
function pcmSamples(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  const samples = new Float32Array(bytes.length >> 1);
  for (let i = 0; i < samples.length; i++) samples[i] = view.getInt16(2 * i, true) / 32768;
  return samples;
}

// Plays chunks back to back as they arrive: each is an AudioBuffer scheduled right after the previous one.
class PcmPlayer {
  constructor(context, sampleRate) {
    this.context = context;
    this.sampleRate = sampleRate;
    this.next = 0;              // context time at which the next chunk starts
    this.startedAt = null;      // context time of the first sample
    this.lead = PLAYBACK_LEAD_S;
    this.gaps = 0;              // chunks that arrived after the previous one had finished playing
    this.sources = new Set();
  }

  play(samples) {
    const buffer = this.context.createBuffer(1, samples.length, this.sampleRate);
    buffer.copyToChannel(samples, 0);
    const source = new AudioBufferSourceNode(this.context, { buffer });
    source.connect(this.context.destination);
    const now = this.context.currentTime;
    if (this.next < now) {
      if (this.startedAt !== null) {
        this.gaps += 1;
        this.lead = Math.min(2 * this.lead, MAX_LEAD_S);
      }
      this.next = now + this.lead;
    }
    source.start(this.next);
    source.addEventListener("ended", () => this.sources.delete(source));
    this.sources.add(source);
    this.startedAt ??= this.next;
    this.next += buffer.duration;
  }

  get playing() {
    return this.startedAt !== null && this.context.currentTime >= this.startedAt;
  }

  stop() {
    for (const source of this.sources) source.stop();
    this.sources.clear();
  }
}

// The waveform of everything received so far: one min..max bar per pixel column, redrawn once per animation frame.
class Waveform {
  constructor(canvas) {
    this.canvas = canvas;
    this.chunks = [];
    this.length = 0;
    this.pending = false;
  }

  clear() {
    this.chunks = [];
    this.length = 0;
    this.draw();
  }

  add(samples) {
    this.chunks.push(samples);
    this.length += samples.length;
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => {
        this.pending = false;
        this.draw();
      });
    }
  }

  draw() {
    const canvas = this.canvas;
    canvas.width = Math.max(1, Math.round(canvas.clientWidth * devicePixelRatio));
    const g = canvas.getContext("2d");
    const mid = canvas.height / 2;
    g.clearRect(0, 0, canvas.width, canvas.height);
    g.fillStyle = getComputedStyle(canvas).color;
    const perColumn = Math.max(1, Math.ceil(this.length / canvas.width));
    let column = 0, lo = 0, hi = 0, seen = 0;
    for (const chunk of this.chunks) {
      for (const s of chunk) {
        lo = Math.min(lo, s);
        hi = Math.max(hi, s);
        if (++seen === perColumn) {
          g.fillRect(column++, mid - hi * mid, 1, Math.max(1, (hi - lo) * mid));
          lo = hi = seen = 0;
        }
      }
    }
  }

  samples() {
    const all = new Float32Array(this.length);
    let at = 0;
    for (const chunk of this.chunks) {
      all.set(chunk, at);
      at += chunk.length;
    }
    return all;
  }
}

// float samples -> 16-bit PCM, raw (pcm) or in a WAV file
function s16le(samples) {
  const view = new DataView(new ArrayBuffer(samples.length * 2));
  samples.forEach((s, i) => view.setInt16(2 * i, Math.max(-32768, Math.min(32767, Math.round(s * 32768))), true));
  return new Uint8Array(view.buffer);
}

function wavFile(samples, sampleRate) {
  const data = s16le(samples);
  const header = new DataView(new ArrayBuffer(44));
  const text = (at, s) => [...s].forEach((c, i) => header.setUint8(at + i, c.charCodeAt(0)));
  text(0, "RIFF"); header.setUint32(4, 36 + data.length, true); text(8, "WAVE");
  text(12, "fmt "); header.setUint32(16, 16, true); header.setUint16(20, 1, true); header.setUint16(22, 1, true);
  header.setUint32(24, sampleRate, true); header.setUint32(28, sampleRate * 2, true);
  header.setUint16(32, 2, true); header.setUint16(34, 16, true);
  text(36, "data"); header.setUint32(40, data.length, true);
  return new Blob([header, data], { type: "audio/wav" });
}

// One run of the Speak button: what the result box shows, and what the tests read back from its data-* attributes.
class Run {
  static count = 0;             // runs so far: data-run tells a waiting test which run the result is of

  constructor(request) {
    this.number = ++Run.count;
    this.request = request;
    this.sampleRate = request.sample_rate || 24000;
    this.controller = new AbortController();
    this.started = performance.now();
    this.firstAudioMs = null;
    this.totalMs = null;
    this.chunks = 0;
    this.playedWhileStreaming = null;   // at the end of the stream: had the first chunk begun to play?
    this.player = new PcmPlayer(audioContext, this.sampleRate);
  }

  show(state) {
    const result = $("#result");
    const audioSeconds = waveform.length / this.sampleRate;
    const elapsedMs = this.totalMs ?? performance.now() - this.started;
    Object.assign(result.dataset, {
      run: this.number, state, chunks: this.chunks, audioSeconds: audioSeconds.toFixed(3),
      firstAudioMs: this.firstAudioMs === null ? "" : Math.round(this.firstAudioMs),
      totalMs: this.totalMs === null ? "" : Math.round(this.totalMs),
      rtf: this.totalMs ? (audioSeconds / (this.totalMs / 1000)).toFixed(2) : "",
      playedWhileStreaming: this.playedWhileStreaming ?? "",
    });
    const ms = (value) => (value === null ? "–" : value < 1000 ? `${Math.round(value)} ms`
      : `${(value / 1000).toFixed(2)} s`);
    $("#t-first").textContent = ms(this.firstAudioMs);
    $("#t-total").textContent = state === "streaming" ? `${ms(elapsedMs)}…` : ms(this.totalMs);
    $("#t-audio").textContent = `${audioSeconds.toFixed(2)} s in ${this.chunks} chunks` +
      (this.player.gaps ? `, ${this.player.gaps} gaps` : "");
    $("#t-rtf").textContent = result.dataset.rtf ? `${result.dataset.rtf}×` : "–";
    $("#t-seed").textContent = String(this.request.seed);
  }
}

let audioContext = null;     // one per page, made on the first click (browsers start audio only after a gesture)
let run = null;              // the run in progress or the last one
const waveform = new Waveform($("#waveform"));

async function speak(event) {
  event.preventDefault();
  audioContext ??= new AudioContext();
  audioContext.resume();
  run = new Run(speechRequest());
  const current = run;
  waveform.clear();
  setReplay(null);
  showError($("#speak-error"), null);
  $("#speak").disabled = true;
  $("#stop").disabled = false;
  current.show("streaming");
  try {
    const response = await api("v1/audio/speech", {
      method: "POST", signal: current.controller.signal,
      json: { ...current.request, response_format: "pcm", stream_format: "sse" },
    });
    let finished = false;
    for await (const data of sseEvents(response.body)) {
      const event = JSON.parse(data);
      if (event.type === "error") throw new ApiFailure(event.error.message);
      finished = event.type === "speech.audio.done";
      if (event.type !== "speech.audio.delta") continue;
      const samples = pcmSamples(event.audio);
      current.firstAudioMs ??= performance.now() - current.started;
      current.chunks += 1;
      current.player.play(samples);
      waveform.add(samples);
      current.show("streaming");
    }
    if (!finished) throw new ApiFailure("the stream ended before the server said it was done (see the server's log)");
    current.totalMs = performance.now() - current.started;
    current.playedWhileStreaming = current.player.playing;
    setReplay(wavFile(waveform.samples(), current.sampleRate));
    current.show("done");
  } catch (err) {
    current.totalMs = performance.now() - current.started;
    if (err.name === "AbortError") {
      current.show("stopped");
    } else {
      showError($("#speak-error"), err);
      current.show("error");
    }
  } finally {
    $("#speak").disabled = false;
    $("#stop").disabled = true;
    refreshHealth();
  }
}

function stop() {
  run.controller.abort();
  run.player.stop();
}

// The replay element holds what was received as a WAV file (it reports the duration), and Download is enabled.
function setReplay(blob) {
  const replay = $("#replay");
  if (replay.src) URL.revokeObjectURL(replay.src);
  if (blob) replay.src = URL.createObjectURL(blob);
  else replay.removeAttribute("src");
  $("#download").disabled = !blob;
  $("#download-status").textContent = "";
}

// The result in the chosen format: WAV and PCM from what was received; others from the server, with the same seed
// and settings, so the same audio.
async function download() {
  const format = $("#format").value;
  const status = $("#download-status");
  const button = $("#download");
  let blob;
  button.disabled = true;
  try {
    if (format === "wav" || format === "pcm") {
      const samples = waveform.samples();
      blob = format === "wav" ? wavFile(samples, run.sampleRate) : new Blob([s16le(samples)]);
    } else {
      status.textContent = `the server makes the ${format} file (same request and seed: the same audio)…`;
      const response = await api("v1/audio/speech", {
        method: "POST", json: { ...run.request, response_format: format },
      });
      blob = await response.blob();
    }
  } catch (err) {
    status.textContent = `download failed: ${err.message}`;
    return;
  } finally {
    button.disabled = false;
  }
  const link = make("a", { href: URL.createObjectURL(blob), download: `speech.${format}` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
  status.textContent = `speech.${format}: ${(blob.size / 1024).toFixed(1)} KiB`;
}

// ---- custom voices: recordings, cloning, designing

// A Record button next to a file input: the recording (when newer than the chosen file) is what gets uploaded. The
// note under them counts the seconds while recording (data-state, data-seconds) and a player previews the audio.
const recordings = new Map();     // file input id -> File made by the microphone

class Recorder {
  constructor(button) {
    this.button = button;
    this.input = $(`#${button.dataset.for}`);
    this.note = $(`.recording[data-of="${this.input.id}"]`);
    this.preview = $(`audio.preview[data-of="${this.input.id}"]`);
    this.recorder = null;
    if (!navigator.mediaDevices || !window.MediaRecorder) {
      button.disabled = true;
      this.report("unavailable", "Recording needs the page on https:// or localhost: choose a file instead.");
    }
    button.addEventListener("click", () => (this.recorder ? this.recorder.stop() : this.begin()));
    this.input.addEventListener("change", () => {
      recordings.delete(this.input.id);
      if (!button.disabled) this.report("", "");
      this.show(this.input.files[0]);
    });
  }

  report(state, text) {
    this.note.dataset.state = state;
    this.note.textContent = text;
  }

  show(blob) {
    if (this.preview.src) URL.revokeObjectURL(this.preview.src);
    this.preview.hidden = !blob;
    if (blob) this.preview.src = URL.createObjectURL(blob);
    else this.preview.removeAttribute("src");
  }

  async begin() {
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (err) {
      this.report("failed", `the microphone is not available: ${err.message}`);
      return;
    }
    const parts = [];
    const began = performance.now();
    const seconds = () => ((performance.now() - began) / 1000).toFixed(1);
    const ticker = setInterval(() => {
      this.note.dataset.seconds = seconds();
      this.note.textContent = `recording… ${seconds()} s`;
    }, 200);
    this.recorder = new MediaRecorder(stream);
    this.recorder.addEventListener("dataavailable", (e) => parts.push(e.data));
    this.recorder.addEventListener("stop", () => {
      clearInterval(ticker);
      stream.getTracks().forEach((t) => t.stop());
      const type = this.recorder.mimeType || "audio/webm";
      const extension = type.includes("ogg") ? "ogg" : type.includes("mp4") ? "m4a" : "webm";
      const file = new File(parts, `recording.${extension}`, { type });
      recordings.set(this.input.id, file);
      this.recorder = null;
      this.button.textContent = "Record";
      this.button.setAttribute("aria-pressed", "false");
      this.report("recorded", `recorded ${seconds()} s (used instead of a file)`);
      this.show(file);
    });
    this.recorder.start();
    this.button.textContent = "Stop recording";
    this.button.setAttribute("aria-pressed", "true");
    this.report("recording", "recording…");
  }
}

function chosenAudio(inputId) {
  return recordings.get(inputId) || $(`#${inputId}`).files[0];
}

function setStatus(form, text) {
  $(".status", form).textContent = text;
}

// Both creations end the same way: the lists reload, the new voice is chosen in the Speak form.
async function created(form, voice) {
  await loadLists();
  chooseVoice(voice.id);
  setStatus(form, `Voice ${voice.name} is ready and chosen above: press Speak.`);
  form.dataset.createdVoice = voice.id;
}

function formOf(fields) {
  const form = new FormData();
  for (const [name, value] of Object.entries(fields)) {
    if (value === undefined || value === "") continue;
    if (value instanceof File) form.append(name, value, value.name);
    else form.append(name, value);
  }
  return form;
}

// The consent first (unless an existing one is chosen), then the voice; a consent made here for a voice that then
// fails is deleted again, so a failed attempt leaves nothing behind.
async function cloneVoice(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const button = $("button[type=submit]", form);
  const name = $("#clone-name").value.trim();
  button.disabled = true;
  let newConsent = null;
  try {
    let consent = $("#consent-choice").value;
    if (!consent) {
      setStatus(form, "uploading the consent recording…");
      newConsent = await apiJson("v1/audio/voice_consents", {
        method: "POST",
        body: formOf({ name, language: $("#consent-language").value.trim(),
                       recording: chosenAudio("consent-recording") }),
      });
      consent = newConsent.id;
    }
    setStatus(form, "cloning the voice (the Base model loads on first use)…");
    const voice = await apiJson("v1/audio/voices", {
      method: "POST",
      body: formOf({ name, consent, audio_sample: chosenAudio("clone-sample"),
                     ref_text: $("#clone-transcript").value.trim() }),
    });
    await created(form, voice);
  } catch (err) {
    if (newConsent) await api(`v1/audio/voice_consents/${newConsent.id}`, { method: "DELETE" }).catch(() => {});
    setStatus(form, `Not created: ${err.message}`);
    form.dataset.createdVoice = "";
  } finally {
    button.disabled = false;
  }
}

async function designVoice(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const button = $("button[type=submit]", form);
  button.disabled = true;
  setStatus(form, "designing the voice (the VoiceDesign model loads on first use)…");
  try {
    const voice = await apiJson("v1/audio/voices", {
      method: "POST",
      json: { type: "prompt", name: $("#design-name").value.trim(), prompt: $("#design-prompt").value.trim(),
              language: $("#design-language").value, script_hint: $("#design-script").value.trim() || undefined },
    });
    await created(form, voice);
  } catch (err) {
    setStatus(form, `Not created: ${err.message}`);
    form.dataset.createdVoice = "";
  } finally {
    button.disabled = false;
  }
}

// ---- start

function init() {
  keyPrompt.init();
  $("#speak-form").addEventListener("submit", speak);
  $("#stop").addEventListener("click", stop);
  $("#download").addEventListener("click", download);
  $("#format").addEventListener("change", () => { $("#download").textContent = `Download ${$("#format").value}`; });
  $("#speed").addEventListener("input", () => { $("#speed-value").value = Number($("#speed").value).toFixed(2); });
  $("#clone-form").addEventListener("submit", cloneVoice);
  $("#design-form").addEventListener("submit", designVoice);
  $("#consent-choice").addEventListener("change", () => {
    $("#new-consent").hidden = $("#consent-choice").value !== "";
  });
  $("#clone-name").addEventListener("input", () => {
    const who = $("#clone-name").value.trim() || "…";
    $("#consent-statement").textContent =
      `I, ${who}, agree that my voice may be used to make a synthetic voice on this server.`;
  });
  document.querySelectorAll("button.record").forEach((button) => new Recorder(button));
  pollHealth();
  loadLists();
}

init();
