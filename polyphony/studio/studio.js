// polyphony studio: pick instruments, call the HTTP API, draw the piano roll, play it.
// No framework and no CDN: this file, index.html and studio.css are the whole page.
"use strict";

const $ = (id) => document.getElementById(id);
const COLOURS = ["#d1495b", "#2e86ab", "#edae49", "#66a182", "#8e6c8a", "#f18f01",
                 "#00798c", "#c73e1d", "#3b1f2b", "#6c8ead", "#a23b72", "#99c24d"];
const DRUMS = 128;
let catalogue = [];
let selected = [];  // [{id, name, density}]
let current = null;  // {notes json, blob url}
let audio = null;
let topP = null;  // generate()'s default, from /api/model

// ------------------------------------------------------------------ instruments
async function loadCatalogue() {
  catalogue = await (await fetch("/api/instruments")).json();
  const list = $("catalogue");
  for (const entry of catalogue) {
    for (const label of [entry.name, ...entry.aliases]) {
      const option = document.createElement("option");
      option.value = label;
      list.appendChild(option);
    }
  }
  const model = await (await fetch("/api/model")).json();
  topP = model.top_p;
  $("top_p").value = topP;
  $("model").textContent = `${model.checkpoint.split("/").pop()} · ${(model.parameters / 1e6).toFixed(2)}M parameters`;
}

function findInstrument(text) {
  const key = text.trim().toLowerCase();
  if (!key) return null;
  return catalogue.find((e) => e.name.toLowerCase() === key || e.aliases.includes(key))
      || catalogue.find((e) => e.name.toLowerCase().includes(key));
}

function addInstrument(event) {
  event.preventDefault();
  for (const part of $("search").value.split(",")) {
    const found = findInstrument(part);
    if (!found) { showError(`unknown instrument '${part.trim()}'`); return; }
    if (!selected.some((s) => s.id === found.id)) {
      selected.push({ id: found.id, name: found.name, density: "" });
    }
  }
  $("search").value = "";
  renderTracks();
}

function renderTracks() {
  const list = $("tracks");
  list.innerHTML = "";
  selected.forEach((track, index) => {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.textContent = track.name;
    const density = document.createElement("select");
    density.title = "notes per bar";
    for (const [value, label] of [["", "default density"], ["sparse", "sparse"],
                                  ["medium", "medium"], ["dense", "dense"]]) {
      const option = new Option(label, value, false, track.density === value);
      density.appendChild(option);
    }
    density.onchange = () => { track.density = density.value; };
    const remove = document.createElement("button");
    remove.textContent = "×";
    remove.title = "remove";
    remove.onclick = () => { selected.splice(index, 1); renderTracks(); };
    item.append(name, density, remove);
    list.appendChild(item);
  });
}

// ------------------------------------------------------------------ requests
function numberOrNull(id) {
  const value = $(id).value;
  return value === "" ? null : Number(value);
}

function densitySpec(tracks) {
  return tracks.filter((t) => t.density).map((t) => `${t.name}=${t.density}`).join(", ") || null;
}

function sampling() {
  return { temperature: numberOrNull("temperature") ?? 1, top_p: numberOrNull("top_p") ?? topP,
           seed: numberOrNull("seed") };
}

async function run(label, request) {
  stop();
  const started = performance.now();
  $("status").className = "";
  $("progress").hidden = false;
  const timer = setInterval(() => {
    $("status").textContent = `${label}… ${((performance.now() - started) / 1000).toFixed(1)} s`;
  }, 100);
  setBusy(true);
  try {
    const response = await request();
    if (!response.ok) {
      const body = await response.json().catch(() => ({ error: response.statusText }));
      throw new Error(body.error || `HTTP ${response.status}`);
    }
    const blob = await response.blob();
    await show(blob);
    $("status").textContent = `done in ${((performance.now() - started) / 1000).toFixed(1)} s`;
  } catch (err) {
    showError(err.message);
  } finally {
    clearInterval(timer);
    $("progress").hidden = true;
    setBusy(false);
  }
}

function setBusy(busy) {
  for (const id of ["generate", "continue", "arrange", "infill"]) $(id).disabled = busy;
}

function showError(message) {
  $("status").className = "error";
  $("status").textContent = String(message).split("\n")[0];
}

function generatePiece() {
  if (!selected.length) { showError("add at least one instrument"); return; }
  const body = {
    instruments: selected.map((t) => t.name),
    bars: numberOrNull("bars") ?? 16,
    tempo: numberOrNull("tempo"),
    time_signature: $("meter").value || null,
    density: densitySpec(selected),
    ...sampling(),
  };
  run("generating", () => fetch("/api/generate", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  }));
}

function withFile(fields) {
  const file = $("file").files[0];
  if (!file) { showError("choose a MIDI file first"); return null; }
  const form = new FormData();
  form.append("file", file);
  for (const [key, value] of Object.entries({ ...fields, ...sampling() })) {
    if (value !== null && value !== "") form.append(key, value);
  }
  return form;
}

function continuePiece() {
  const form = withFile({ bars: numberOrNull("continue_bars") ?? 8,
                          prompt_bars: numberOrNull("prompt_bars") });
  if (form) run("continuing", () => fetch("/api/continue", { method: "POST", body: form }));
}

function arrangePiece() {
  const add = $("add_instruments").value.trim();
  if (!add) { showError("name the instruments to add"); return; }
  const form = withFile({ add });
  if (form) run("arranging", () => fetch("/api/arrange", { method: "POST", body: form }));
}

function infillPiece() {
  const bars = $("infill_bars").value.trim();
  if (!bars) { showError("give the bars to write again, e.g. 9-12"); return; }
  const form = withFile({ bars, tracks: $("infill_tracks").value.trim() });
  if (form) run("infilling", () => fetch("/api/infill", { method: "POST", body: form }));
}

// ------------------------------------------------------------------ result
async function show(blob) {
  const form = new FormData();
  form.append("file", blob, "result.mid");
  const response = await fetch("/api/notes", { method: "POST", body: form });
  if (!response.ok) throw new Error((await response.json()).error);
  const notes = await response.json();
  if (current) URL.revokeObjectURL(current.url);
  current = { notes, url: URL.createObjectURL(blob) };
  $("download").href = current.url;
  $("download").hidden = false;
  $("play").disabled = false;
  renderLegend(notes);
  drawRoll(notes);
}

function renderLegend(notes) {
  const legend = $("legend");
  legend.innerHTML = "";
  notes.tracks.forEach((track, index) => {
    const item = document.createElement("li");
    item.style.setProperty("--colour", COLOURS[index % COLOURS.length]);
    item.textContent = `${track.name} (${track.notes.length} notes)`;
    legend.appendChild(item);
  });
}

function drawRoll(notes) {
  const canvas = $("roll");
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  context.clearRect(0, 0, width, height);
  const pitched = notes.tracks.flatMap((t) => (t.instrument === DRUMS ? [] : t.notes));
  const low = Math.min(...pitched.map((n) => n[2]), 36) - 2;
  const high = Math.max(...pitched.map((n) => n[2]), 84) + 2;
  const beats = Math.max(notes.beats, 1);
  const x = (beat) => (beat / beats) * width;
  const drumBand = notes.tracks.some((t) => t.instrument === DRUMS) ? 60 : 0;
  const rowHeight = (height - drumBand) / (high - low);
  const y = (pitch) => (high - pitch) * rowHeight;
  context.strokeStyle = "#ccc";
  for (const bar of notes.bars) {
    context.beginPath();
    context.moveTo(x(bar) + 0.5, 0);
    context.lineTo(x(bar) + 0.5, height);
    context.stroke();
  }
  notes.tracks.forEach((track, index) => {
    context.fillStyle = COLOURS[index % COLOURS.length];
    for (const [start, duration, pitch] of track.notes) {
      if (track.instrument === DRUMS) {
        const row = height - drumBand + ((pitch - 35) % 12) * (drumBand / 12);
        context.fillRect(x(start), row, 3, drumBand / 12);
      } else {
        context.fillRect(x(start), y(pitch), Math.max(x(duration), 2), Math.max(rowHeight, 2));
      }
    }
  });
  if (drumBand) {
    context.fillStyle = "#888";
    context.fillText("drums", 4, height - drumBand - 4);
  }
}

// ------------------------------------------------------------------ playback
// A small in-page synthesizer (Web Audio): one oscillator per note, shaped by family; drums
// are filtered noise and a falling sine. Enough to hear the parts; download for real sounds.
function voice(program) {
  if (program < 8) return "triangle";
  if (program >= 32 && program < 40) return "sawtooth";
  if (program >= 24 && program < 32) return "square";
  if (program >= 80 && program < 88) return "square";
  return "triangle";
}

function play() {
  if (!current) return;
  stop();
  audio = new AudioContext();
  const secondsPerBeat = 60 / current.notes.qpm;
  const start = audio.currentTime + 0.1;
  const master = audio.createGain();
  master.gain.value = 0.25;
  master.connect(audio.destination);
  const noise = audio.createBuffer(1, audio.sampleRate * 0.3, audio.sampleRate);
  const samples = noise.getChannelData(0);
  for (let i = 0; i < samples.length; i++) samples[i] = Math.random() * 2 - 1;
  for (const track of current.notes.tracks) {
    for (const [beat, duration, pitch, velocity] of track.notes) {
      const when = start + beat * secondsPerBeat;
      const gain = audio.createGain();
      const level = (velocity / 127) * 0.5;
      gain.connect(master);
      if (track.instrument === DRUMS) {
        const kick = pitch === 35 || pitch === 36;
        const source = kick ? audio.createOscillator() : audio.createBufferSource();
        if (kick) {
          source.frequency.setValueAtTime(120, when);
          source.frequency.exponentialRampToValueAtTime(40, when + 0.12);
        } else {
          source.buffer = noise;
          const filter = audio.createBiquadFilter();
          filter.type = pitch < 45 ? "bandpass" : "highpass";
          filter.frequency.value = pitch < 45 ? 1800 : 7000;
          source.connect(filter);
          filter.connect(gain);
        }
        if (kick) source.connect(gain);
        gain.gain.setValueAtTime(level, when);
        gain.gain.exponentialRampToValueAtTime(0.001, when + (kick ? 0.2 : 0.08));
        source.start(when);
        source.stop(when + 0.25);
      } else {
        const oscillator = audio.createOscillator();
        oscillator.type = voice(track.instrument);
        oscillator.frequency.value = 440 * 2 ** ((pitch - 69) / 12);
        const end = when + Math.max(duration * secondsPerBeat, 0.05);
        gain.gain.setValueAtTime(0, when);
        gain.gain.linearRampToValueAtTime(level * 0.6, when + 0.01);
        gain.gain.setTargetAtTime(0, end, 0.05);
        oscillator.connect(gain);
        oscillator.start(when);
        oscillator.stop(end + 0.3);
      }
    }
  }
  $("stop").disabled = false;
}

function stop() {
  if (audio) { audio.close(); audio = null; }
  $("stop").disabled = true;
}

// ------------------------------------------------------------------ wiring
$("pick").addEventListener("submit", addInstrument);
$("generate").addEventListener("click", generatePiece);
$("continue").addEventListener("click", continuePiece);
$("arrange").addEventListener("click", arrangePiece);
$("infill").addEventListener("click", infillPiece);
$("play").addEventListener("click", play);
$("stop").addEventListener("click", stop);
loadCatalogue().catch((err) => showError(`cannot reach the server: ${err.message}`));
