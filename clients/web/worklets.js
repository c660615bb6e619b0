// AudioWorklet processors of the Stemme page.
// capture: mono float at the context rate -> 16 kHz PCM16 frames of 20 ms, plus the input level.
// playback: a jitter buffer of 24 kHz float samples; plays as soon as audio arrives, silence on underrun,
// drops everything at once on 'clear' (barge-in).

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ratio = sampleRate / 16000;   // the context rate is 16 kHz when the browser allows it
    this.acc = 0; this.sum = 0; this.n = 0;
    this.out = new Int16Array(320); this.fill = 0;
    this.levelSum = 0; this.levelN = 0;
  }
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (!ch) return true;
    for (let i = 0; i < ch.length; i++) {
      const x = ch[i];
      this.levelSum += x * x; this.levelN++;
      // decimation by averaging (a box low-pass) when the context runs above 16 kHz
      this.sum += x; this.n++; this.acc += 1;
      if (this.acc >= this.ratio) {
        this.acc -= this.ratio;
        const v = Math.max(-1, Math.min(1, this.sum / this.n));
        this.sum = 0; this.n = 0;
        this.out[this.fill++] = v < 0 ? v * 32768 : v * 32767;
        if (this.fill === this.out.length) {
          this.port.postMessage({ pcm: this.out.buffer.slice(0), level: Math.sqrt(this.levelSum / this.levelN) });
          this.fill = 0; this.levelSum = 0; this.levelN = 0;
        }
      }
    }
    return true;
  }
}

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.chunks = []; this.offset = 0; this.buffered = 0;
    this.played = 0; this.underruns = 0; this.playing = false; this.tick = 0;
    this.port.onmessage = (e) => {
      const m = e.data;
      if (m.type === 'audio') { this.chunks.push(m.samples); this.buffered += m.samples.length; }
      else if (m.type === 'clear') {
        const dropped = this.buffered;
        this.chunks = []; this.offset = 0; this.buffered = 0; this.playing = false;
        this.port.postMessage({ type: 'cleared', dropped, played: this.played });
      }
    };
  }
  process(_inputs, outputs) {
    const out = outputs[0][0];
    let i = 0;
    while (i < out.length && this.chunks.length) {
      const c = this.chunks[0];
      const n = Math.min(out.length - i, c.length - this.offset);
      out.set(c.subarray(this.offset, this.offset + n), i);
      i += n; this.offset += n; this.buffered -= n; this.played += n;
      if (this.offset >= c.length) { this.chunks.shift(); this.offset = 0; }
    }
    if (i < out.length) {
      out.fill(0, i);
      if (this.playing && i === 0) { this.underruns++; this.playing = false; }
    } else { this.playing = true; }
    if (++this.tick % 8 === 0) {
      this.port.postMessage({ type: 'stats', played: this.played, buffered: this.buffered, underruns: this.underruns });
    }
    return true;
  }
}

registerProcessor('stemme-capture', CaptureProcessor);
registerProcessor('stemme-playback', PlaybackProcessor);
