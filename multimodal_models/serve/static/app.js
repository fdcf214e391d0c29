// The web page: search the collection, caption / ask / chat about an image.
// Plain browser JavaScript, no build step, no external resources; it talks to the same
// endpoints any client uses (/v1/search, /v1/caption, /v1/answer, /v1/chat/completions,
// /v1/audio/transcriptions for the microphone).
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_FILE_BYTES = 20 * 1024 * 1024;
const state = {
  file: null,        // the picked File (sent as a multipart upload), or null for a search result
  dataURI: null,     // the image as a data: URI (chat and "find similar" send it as JSON)
  name: "",
  chat: [],          // the conversation in OpenAI's message format
  apiKey: sessionStorage.getItem("multimodal-api-key") || "",
};

// --- errors and requests -------------------------------------------------------------------

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.classList.remove("hidden");
}

function clearError() {
  $("error").classList.add("hidden");
  $("error").textContent = "";
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `the server answered ${response.status} ${response.statusText}`;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.apiKey) headers["Authorization"] = `Bearer ${state.apiKey}`;
  let response;
  try {
    response = await fetch(path, Object.assign({}, options, { headers }));
  } catch (err) {
    throw new Error(`cannot reach the server (${err.message})`);
  }
  if (response.status === 401) $("key-form").classList.remove("hidden");
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

async function postJSON(path, body) {
  const response = await api(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  return response.json();
}

// Run `work` with `buttons` disabled; show its error (about the current image when `aboutImage`).
async function busy(buttons, work, aboutImage = false) {
  clearError();
  buttons.forEach((b) => { b.disabled = true; });
  try {
    return await work();
  } catch (err) {
    showError(aboutImage && state.name ? `${state.name}: ${err.message.replace(/^image: /, "")}` : err.message);
    return null;
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
    updateButtons();
  }
}

// --- server status -----------------------------------------------------------------------------

async function loadStatus() {
  try {
    const health = await (await fetch("/health")).json();
    const parts = [];
    if (health.models.vlm) parts.push(`VLM ${health.models.vlm}`);
    if (health.models.embedder) parts.push(`embedder ${health.models.embedder}`);
    if (health.models.speech) parts.push(`speech ${health.models.speech}`);
    parts.push(health.index ? `index of ${health.index.images} images` : "no image index");
    $("status").textContent = parts.join(" · ");
    state.health = health;
    if (!health.index) $("search-info").textContent = "This server has no image index (start it with --index DIR).";
    if (health.auth && !state.apiKey) $("key-form").classList.remove("hidden");
  } catch (err) {
    $("status").textContent = "the server does not answer";
  }
  updateButtons();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.apiKey = $("api-key").value.trim();
  sessionStorage.setItem("multimodal-api-key", state.apiKey);
  $("key-form").classList.add("hidden");
  clearError();
});

// --- search ------------------------------------------------------------------------------------

function renderResults(hits, what) {
  const grid = $("results");
  grid.replaceChildren();
  $("search-info").textContent = hits.length ? `${hits.length} results for ${what}` : `nothing found for ${what}`;
  for (const hit of hits) {
    const figure = document.createElement("figure");
    figure.tabIndex = 0;
    figure.className = "result";
    figure.title = "use this image";
    if (hit.thumbnail) {
      const img = document.createElement("img");
      img.src = hit.thumbnail;
      img.alt = hit.caption || hit.path;
      figure.appendChild(img);
    }
    const caption = document.createElement("figcaption");
    const path = document.createElement("span");
    path.className = "path";
    path.textContent = hit.path;
    path.title = hit.path;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `score ${hit.score.toFixed(3)}` + (hit.caption ? ` · ${hit.caption}` : "");
    caption.append(path, score);
    figure.appendChild(caption);
    const choose = () => { if (hit.thumbnail) useImage(null, hit.thumbnail, hit.path); };
    figure.addEventListener("click", choose);
    figure.addEventListener("keydown", (e) => { if (e.key === "Enter") choose(); });
    grid.appendChild(figure);
  }
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const query = $("search-query").value.trim();
  if (!query) { showError("type something to search for"); return; }
  busy([$("search-button")], async () => {
    const rerank = $("search-rerank").checked && !$("search-rerank").disabled;
    const result = await postJSON("/v1/search", rerank ? { query, k: 12, rerank: true } : { query, k: 12 });
    renderResults(result.data, `“${query}”` + (rerank ? ", reranked by the VLM" : ""));
  });
});

$("similar-button").addEventListener("click", () => {
  busy([$("similar-button")], async () => {
    const result = await postJSON("/v1/search", { image: state.dataURI, k: 12 });
    renderResults(result.data, state.name || "the image");
  }, true);
});

// --- choosing an image ---------------------------------------------------------------------------

function readDataURI(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

async function pickFile(file) {
  clearError();
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`${file.name} is not an image (${file.type}); pick a PNG, JPEG, WebP, BMP or GIF file`);
    return;
  }
  if (file.size > MAX_FILE_BYTES) {
    showError(`${file.name} is ${(file.size / 1048576).toFixed(1)} MB; the limit is 20 MB`);
    return;
  }
  try {
    useImage(file, await readDataURI(file), file.name);
  } catch (err) {
    showError(err.message);
  }
}

function useImage(file, dataURI, name) {
  state.file = file;
  state.dataURI = dataURI;
  state.name = name;
  const preview = $("preview");
  preview.src = dataURI;
  preview.alt = name;
  preview.classList.remove("hidden");
  $("drop-hint").classList.add("hidden");
  $("caption").textContent = "";
  $("answer").textContent = "";
  resetChat();
  updateButtons();
  caption();  // picking an image captions it
}

$("preview").addEventListener("error", () => {
  $("preview").classList.add("hidden");
  $("drop-hint").classList.remove("hidden");
});

$("file-input").addEventListener("change", (event) => {
  pickFile(event.target.files[0]);
  event.target.value = "";  // picking the same file again fires again
});

const zone = $("drop-zone");
zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
zone.addEventListener("drop", (event) => {
  event.preventDefault();
  zone.classList.remove("dragging");
  const file = event.dataTransfer.files[0];
  if (!file) { showError("drop an image file"); return; }
  pickFile(file);
});
zone.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") $("file-input").click(); });

function updateButtons() {
  const haveImage = Boolean(state.dataURI);
  const vlm = !state.health || Boolean(state.health.models.vlm);
  const index = !state.health || Boolean(state.health.index);
  $("caption-button").disabled = !haveImage || !vlm;
  $("ask-button").disabled = !haveImage || !vlm;
  $("chat-button").disabled = !haveImage || !vlm;
  $("similar-button").disabled = !haveImage || !index;
  $("search-button").disabled = !index;
  $("search-rerank").disabled = !index || !vlm;
  const speech = Boolean(state.health && state.health.models.speech) && Boolean(navigator.mediaDevices)
    && typeof MediaRecorder !== "undefined";
  $("mic-button").classList.toggle("hidden", !speech);
  $("mic-button").disabled = !speech || (!state.recorder && (!haveImage || !vlm));
}

// --- caption and answer --------------------------------------------------------------------------

function imageBody(fields) {
  // an uploaded file goes as multipart; a search result (thumbnail) as JSON with its data: URI
  if (state.file) {
    const form = new FormData();
    form.append("image", state.file, state.file.name);
    for (const [key, value] of Object.entries(fields)) form.append(key, value);
    return { method: "POST", body: form };
  }
  return { method: "POST", headers: { "Content-Type": "application/json" },
           body: JSON.stringify(Object.assign({ image: state.dataURI }, fields)) };
}

function shown(result) {
  return result.text === null ? `(withheld: ${result.refusal})` : (result.text || "(no words)");
}

function caption() {
  $("caption").textContent = "…";
  return busy([$("caption-button")], async () => {
    const result = await (await api("/v1/caption", imageBody({}))).json();
    $("caption").textContent = shown(result);
  }, true).then(() => { if ($("caption").textContent === "…") $("caption").textContent = ""; });
}

$("caption-button").addEventListener("click", caption);

$("ask-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) { showError("type a question"); return; }
  $("answer").textContent = "…";
  busy([$("ask-button")], async () => {
    const result = await (await api("/v1/answer", imageBody({ question }))).json();
    $("answer").textContent = shown(result);
  }, true).then(() => { if ($("answer").textContent === "…") $("answer").textContent = ""; });
});

// --- chat (streamed) ----------------------------------------------------------------------------

function resetChat() {
  state.chat = [];
  $("chat-log").replaceChildren();
}

$("chat-reset").addEventListener("click", resetChat);

function addBubble(role, text) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = text;
  $("chat-log").appendChild(li);
  return li;
}

// Read OpenAI's server-sent events: "data: {chunk}\n\n" ... "data: [DONE]\n\n".
async function readStream(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices && chunk.choices[0];
        if (choice) onDelta(choice.delta || {}, choice.finish_reason);
      }
    }
  }
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text) { showError("type a message"); return; }
  const content = state.chat.length === 0
    ? [{ type: "image_url", image_url: { url: state.dataURI } }, { type: "text", text }]
    : text;
  const messages = state.chat.concat([{ role: "user", content }]);
  addBubble("user", text);
  const bubble = addBubble("assistant streaming", "");
  $("chat-input").value = "";
  busy([$("chat-button")], async () => {
    const response = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ messages, stream: true }),
    });
    let reply = "";
    await readStream(response, (delta) => {
      if (delta.content) { reply += delta.content; bubble.textContent = reply; }
      if (delta.refusal) bubble.textContent = `${reply} (withheld: ${delta.refusal})`;
    });
    state.chat = messages.concat([{ role: "assistant", content: reply }]);
    if (!reply) bubble.textContent = "(no words)";
  }, true).finally(() => {
    bubble.classList.remove("streaming");
    bubble.dataset.done = "true";
    if (state.chat.length < messages.length + 1) bubble.classList.add("failed");
  });
});

loadStatus();

// --- the microphone: record, transcribe, ask --------------------------------------------------------
// MediaRecorder records (webm/opus in Chromium, ogg in Firefox, mp4 in Safari); the page decodes the
// recording and sends it as 16 kHz mono WAV, a format the server reads whatever the browser recorded.
// Recording stops on a second click or by itself at the server's limit (health.max_audio_seconds).

const SPEECH_RATE = 16000;

function wavFile(samples, rate) {
  const view = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, samples.length * 2, true);
  samples.forEach((x, i) => view.setInt16(44 + i * 2, Math.max(-1, Math.min(1, x)) * 0x7fff, true));
  return new Blob([view], { type: "audio/wav" });
}

async function recordingToWav(blob, maxSeconds) {
  const context = new AudioContext();
  let decoded;
  try {
    decoded = await context.decodeAudioData(await blob.arrayBuffer());
  } finally {
    context.close();
  }
  const frames = Math.min(Math.ceil(decoded.duration * SPEECH_RATE), Math.floor(maxSeconds * SPEECH_RATE));
  if (frames <= 0) throw new Error("the recording is empty");
  const offline = new OfflineAudioContext(1, frames, SPEECH_RATE);  // mixes down and resamples
  const source = offline.createBufferSource();
  source.buffer = decoded;
  source.connect(offline.destination);
  source.start();
  return wavFile((await offline.startRendering()).getChannelData(0), SPEECH_RATE);
}

async function startRecording() {
  clearError();
  let stream;
  try {  // the raw signal: the speech model is trained on it, not on the call-processing's output
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false } });
  } catch (err) {
    showError(`cannot use the microphone (${err.message || err.name})`);
    return;
  }
  const recorder = new MediaRecorder(stream);
  const chunks = [];
  const maxSeconds = (state.health && state.health.max_audio_seconds) || 30;
  recorder.addEventListener("dataavailable", (event) => { if (event.data.size) chunks.push(event.data); });
  recorder.addEventListener("stop", () => {
    stream.getTracks().forEach((track) => track.stop());
    clearTimeout(state.recordTimer);
    state.recorder = null;
    $("mic-button").setAttribute("aria-pressed", "false");
    $("mic-button").textContent = "🎤 Speak";
    transcribeAndAsk(new Blob(chunks, { type: recorder.mimeType }), maxSeconds);
  });
  state.recorder = recorder;
  recorder.start();
  // a little past the limit, so that a recording cut at the limit is full (it is trimmed to the limit)
  state.recordTimer = setTimeout(() => { if (recorder.state === "recording") recorder.stop(); },
                                 maxSeconds * 1000 + 300);
  $("mic-button").setAttribute("aria-pressed", "true");
  $("mic-button").textContent = "■ Stop";
  $("mic-status").textContent = `listening… (click Stop when done; at most ${maxSeconds} s)`;
  updateButtons();
}

function transcribeAndAsk(blob, maxSeconds) {
  $("mic-status").textContent = "transcribing…";
  return busy([$("mic-button")], async () => {
    const form = new FormData();
    form.append("file", await recordingToWav(blob, maxSeconds), "question.wav");
    form.append("model", state.health.models.speech);
    form.append("response_format", "json");
    const result = await (await api("/v1/audio/transcriptions", { method: "POST", body: form })).json();
    $("mic-status").textContent = `heard: “${result.text}”`;
    if (!result.text.trim()) throw new Error("no words were heard; try again");
    $("question").value = result.text;
    $("ask-form").requestSubmit();
  }).then(() => { if ($("mic-status").textContent === "transcribing…") $("mic-status").textContent = ""; });
}

$("mic-button").addEventListener("click", () => {
  if (state.recorder) state.recorder.stop();
  else startRecording();
});
