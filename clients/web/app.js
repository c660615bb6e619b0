// Stemme browser page: microphone -> 16 kHz PCM16 binary frames -> server; server audio -> jitter buffer.
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  const stats = window.stemmeStats = {
    state: 'connecting', played: 0, buffered: 0, underruns: 0, cleared: 0, dropped: 0, audioIn: 0,
    turns: 0, responses: 0, stale: 0, voices: 0, transcript: '', reply: '', language: '', latency: null, events: [], errors: [],
  };
  const params = new URLSearchParams(location.search);
  let key = params.get('key') || sessionStorage.getItem('stemme-key') || '';
  let ws = null, micCtx = null, micStream = null, playCtx = null, playNode = null;
  let currentItem = null, itemStartPlayed = 0, replyText = '', afterClear = false;

  function setState(s, text) { stats.state = s; $('state').dataset.state = s; $('state').textContent = text; }
  function message(text) { const m = $('message'); m.textContent = text || ''; m.hidden = !text; if (text) stats.errors.push(text); }

  async function loadVoices() {
    try {
      const r = await fetch('/v1/voices', key ? {headers: {Authorization: `Bearer ${key}`}} : {});
      if (r.status === 401) return;  // the key is asked for when the session is refused
      const data = await r.json();
      const lang = $('language'), voice = $('voice');
      const groups = new Map();
      for (const l of data.languages) {
        const o = document.createElement('option'); o.value = l.code; o.textContent = `${l.name} (${l.code})`; lang.append(o);
        const g = document.createElement('optgroup'); g.label = `${l.name} (${l.code})`; g.dataset.language = l.code;
        groups.set(l.code, g); voice.append(g);
      }
      // every voice, grouped by language, best first; the label carries the engine and the quality notes
      for (const v of data.voices) {
        const o = document.createElement('option'); o.value = v.name;
        o.textContent = `${v.default ? '★ ' : ''}${v.name}${v.description ? ' — ' + v.description : ''}`;
        o.title = v.description || ''; o.dataset.language = v.language; o.dataset.engine = v.engine;
        (groups.get(v.language) || voice).append(o);
      }
      stats.voices = data.voices.length;
    } catch (e) {
      // a connection problem, if any, is the message that matters
      if (stats.state !== 'error') message('Could not load the list of voices from the server.');
    }
  }

  function send(ev) { if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(ev)); }

  function sessionUpdate() {
    const language = $('language').value || null;
    const voice = $('voice').value || null;
    send({ type: 'session.update', session: { type: 'realtime', audio: {
      input: { format: { type: 'audio/pcm', rate: 16000 }, transcription: { model: 'whisper-base', language },
               turn_detection: { type: 'server_vad', silence_duration_ms: 500 } },
      output: voice ? { voice } : {} } } });
  }

  function connect() {
    const proto = location.protocol === 'https:' ? 'wss' : 'ws';
    const q = new URLSearchParams({ model: 'stemme', audio: 'binary' });
    if (key) q.set('api_key', key);
    let opened = false, refused = false;
    setState('connecting', 'Connecting…');
    ws = new WebSocket(`${proto}://${location.host}/v1/realtime?${q}`);
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => { opened = true; };
    ws.onmessage = (e) => {
      if (typeof e.data !== 'string') { playAudio(e.data); return; }
      const ev = JSON.parse(e.data);
      if (ev.type === 'error' && ev.error.code === 'invalid_api_key') refused = true;
      onEvent(ev);
    };
    ws.onclose = (e) => {
      if (refused || e.code === 1008) {
        setState('error', 'API key refused');
        message('This server requires an API key, and the key was missing or wrong. Enter it above.');
        $('key-row').hidden = false; $('key').focus();
      } else if (!opened) {
        setState('error', 'Server unreachable');
        message(`Cannot reach the Stemme server at ${location.host}. Is it running? Retrying in 3 s.`);
        setTimeout(connect, 3000);
      } else {
        setState('error', 'Disconnected');
        message('The connection to the server was lost. Reconnecting…');
        setTimeout(connect, 1500);
      }
      stopMic();
    };
  }

  function onEvent(ev) {
    stats.events.push(ev.type);
    if (stats.events.length > 500) stats.events.shift();
    switch (ev.type) {
      case 'session.created': setState('ready', 'Connected'); message(''); sessionUpdate(); break;
      case 'input_audio_buffer.speech_started': $('vad').textContent = 'listening…'; break;
      case 'input_audio_buffer.speech_stopped': $('vad').textContent = 'thinking…'; break;
      case 'conversation.item.input_audio_transcription.completed':
        stats.transcript = ev.transcript; $('user-text').textContent = ev.transcript;
        if (ev.stemme && ev.stemme.language) { stats.language = ev.stemme.language; $('detected').textContent = ev.stemme.language; }
        break;
      case 'conversation.item.added':
        if (ev.item.role === 'user' && ev.item.content && ev.item.content[0] && ev.item.content[0].type === 'input_text') {
          $('user-text').textContent = ev.item.content[0].text;
        }
        break;
      case 'response.created': stats.responses++; afterClear = false; replyText = ''; $('reply-text').textContent = ''; $('vad').textContent = ''; break;
      case 'response.output_item.added': currentItem = ev.item.id; itemStartPlayed = stats.played + stats.buffered; break;
      case 'response.output_audio_transcript.delta':
      case 'response.output_text.delta':
        replyText += ev.delta; stats.reply = replyText; $('reply-text').textContent = replyText; break;
      case 'output_audio_buffer.cleared': clearPlayback(); break;
      case 'response.done':
        stats.turns++;
        if (ev.stemme && ev.stemme.latency) showLatency(ev.stemme.latency);
        if (ev.response.status === 'cancelled') $('reply-text').textContent = replyText + ' …';
        break;
      case 'error': message(`Server: ${ev.error.message}`); break;
    }
  }

  function showLatency(l) {
    stats.latency = l;
    for (const td of document.querySelectorAll('#latency td')) {
      const v = l[td.dataset.key];
      td.textContent = v == null ? '–' : `${v} ms`;
    }
  }

  async function ensurePlayback() {
    if (playCtx) return;
    playCtx = new AudioContext({ sampleRate: 24000 });
    await playCtx.audioWorklet.addModule('/static/worklets.js');
    playNode = new AudioWorkletNode(playCtx, 'stemme-playback', { outputChannelCount: [1] });
    playNode.port.onmessage = (e) => {
      const m = e.data;
      if (m.type === 'stats') { stats.played = m.played; stats.buffered = m.buffered; stats.underruns = m.underruns; }
      else if (m.type === 'cleared') { stats.dropped += m.dropped; stats.played = m.played; stats.buffered = 0; }
    };
    playNode.connect(playCtx.destination);
  }

  function playAudio(buf) {
    if (!playNode) { ensurePlayback().then(() => playAudio(buf)); return; }
    // audio of an interrupted answer still in flight when the buffer was cleared is never played
    if (afterClear) { stats.stale += buf.byteLength / 2; return; }
    const pcm = new Int16Array(buf);
    const f = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) f[i] = pcm[i] / 32768;
    stats.buffered += f.length;
    playNode.port.postMessage({ type: 'audio', samples: f }, [f.buffer]);
  }

  function clearPlayback() {
    stats.cleared++; afterClear = true;
    if (playNode) playNode.port.postMessage({ type: 'clear' });
    if (currentItem) {
      // keep in the conversation only what was heard
      const heardMs = Math.max(0, Math.round((stats.played - itemStartPlayed) / 24));
      send({ type: 'conversation.item.truncate', item_id: currentItem, content_index: 0, audio_end_ms: heardMs });
      currentItem = null;
    }
  }

  async function startMic() {
    try {
      micStream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true } });
    } catch (e) {
      message(e && e.name === 'NotAllowedError'
        ? 'Microphone access was denied. Allow it in the browser settings, or type below.'
        : `No microphone available (${e && e.name}). You can type below.`);
      return;
    }
    try { micCtx = new AudioContext({ sampleRate: 16000 }); } catch (e) { micCtx = new AudioContext(); }
    await micCtx.audioWorklet.addModule('/static/worklets.js');
    let src;
    try { src = micCtx.createMediaStreamSource(micStream); }
    catch (e) { await micCtx.close(); micCtx = new AudioContext(); await micCtx.audioWorklet.addModule('/static/worklets.js'); src = micCtx.createMediaStreamSource(micStream); }
    const node = new AudioWorkletNode(micCtx, 'stemme-capture');
    node.port.onmessage = (e) => {
      const lvl = Math.min(100, Math.round(e.data.level * 300));
      $('level').style.width = lvl + '%';
      document.querySelector('.meter').setAttribute('aria-valuenow', String(lvl));
      if (ws && ws.readyState === WebSocket.OPEN) { ws.send(e.data.pcm); stats.audioIn += 320; }
    };
    src.connect(node);
    $('mic').textContent = 'Stop microphone'; $('mic').setAttribute('aria-pressed', 'true');
    await ensurePlayback();
  }

  function stopMic() {
    if (micStream) micStream.getTracks().forEach((t) => t.stop());
    if (micCtx) micCtx.close();
    micStream = null; micCtx = null;
    $('mic').textContent = 'Start microphone'; $('mic').setAttribute('aria-pressed', 'false');
    $('level').style.width = '0';
  }

  $('mic').addEventListener('click', () => (micStream ? stopMic() : startMic()));
  $('language').addEventListener('change', () => {
    const l = $('language').value, voice = $('voice');
    for (const g of voice.querySelectorAll('optgroup')) g.hidden = !!(l && g.dataset.language !== l);
    for (const o of voice.options) o.hidden = !!(l && o.dataset.language && o.dataset.language !== l);
    if (voice.selectedOptions[0] && voice.selectedOptions[0].hidden) voice.value = '';
    sessionUpdate();
  });
  $('voice').addEventListener('change', sessionUpdate);
  $('key-save').addEventListener('click', () => { key = $('key').value; sessionStorage.setItem('stemme-key', key); $('key-row').hidden = true; message(''); if ($('language').options.length < 2) loadVoices(); connect(); });
  $('text-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const text = $('text').value.trim();
    if (!text) return;
    await ensurePlayback();
    send({ type: 'conversation.item.create', item: { type: 'message', role: 'user', content: [{ type: 'input_text', text }] } });
    send({ type: 'response.create' });
    $('text').value = '';
  });

  loadVoices();
  connect();
})();
