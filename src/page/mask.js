// The inpainting brush: a mask the size of the picture, painted with the pointer, shown over the picture.

/** Paints a mask over `canvas`; white = repaint, exported as a PNG of the picture's size. */
export class MaskPainter {
  constructor(canvas) {
    this.canvas = canvas;
    this.mask = document.createElement("canvas");
    this.picture = null;
    this.brush = 8;
    this.erase = false;
    this.enabled = false;
    let last = null;
    const at = (event) => {
      const box = canvas.getBoundingClientRect();
      return [((event.clientX - box.left) * canvas.width) / box.width, ((event.clientY - box.top) * canvas.height) / box.height];
    };
    canvas.addEventListener("pointerdown", (event) => {
      if (!this.enabled || !this.picture) return;
      canvas.setPointerCapture(event.pointerId);
      last = at(event);
      this.stroke(last, last);
    });
    canvas.addEventListener("pointermove", (event) => {
      if (last === null) return;
      const point = at(event);
      this.stroke(last, point);
      last = point;
    });
    const stop = () => {
      last = null;
    };
    canvas.addEventListener("pointerup", stop);
    canvas.addEventListener("pointercancel", stop);
    canvas.addEventListener("keydown", (event) => this.key(event));
  }

  /** Keyboard painting: arrows move the brush (painting while Shift is held), Space paints where it is. */
  key(event) {
    if (!this.enabled || !this.picture) return;
    const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    const step = Math.max(1, Math.round(this.brush / 2));
    this.cursor ??= [this.canvas.width / 2, this.canvas.height / 2];
    if (event.key in moves) {
      const [dx, dy] = moves[event.key];
      const from = this.cursor;
      this.cursor = [
        Math.min(this.canvas.width, Math.max(0, from[0] + dx * step)),
        Math.min(this.canvas.height, Math.max(0, from[1] + dy * step)),
      ];
      if (event.shiftKey) this.stroke(from, this.cursor);
      else this.draw();
    } else if (event.key === " " || event.key === "Enter") {
      this.stroke(this.cursor, this.cursor);
    } else {
      return;
    }
    event.preventDefault();
  }

  /** Shows `picture` (an image element, loaded) with an empty mask. */
  setPicture(picture) {
    this.picture = picture;
    for (const target of [this.canvas, this.mask]) {
      target.width = picture.naturalWidth;
      target.height = picture.naturalHeight;
    }
    this.clear();
  }

  stroke([x0, y0], [x1, y1]) {
    const context = this.mask.getContext("2d");
    context.globalCompositeOperation = this.erase ? "destination-out" : "source-over";
    context.strokeStyle = "white";
    context.lineWidth = this.brush;
    context.lineCap = "round";
    context.beginPath();
    context.moveTo(x0, y0);
    context.lineTo(x1, y1);
    context.stroke();
    this.draw();
  }

  /** Empties the mask. */
  clear() {
    this.mask.getContext("2d").clearRect(0, 0, this.mask.width, this.mask.height);
    this.draw();
  }

  /** Masks the whole picture. */
  fill() {
    const context = this.mask.getContext("2d");
    context.globalCompositeOperation = "source-over";
    context.fillStyle = "white";
    context.fillRect(0, 0, this.mask.width, this.mask.height);
    this.draw();
  }

  /** Swaps masked and unmasked. */
  invert() {
    const context = this.mask.getContext("2d");
    const pixels = context.getImageData(0, 0, this.mask.width, this.mask.height);
    for (let i = 0; i < pixels.data.length; i += 4) {
      const alpha = 255 - pixels.data[i + 3];
      pixels.data.set([255, 255, 255, alpha], i);
    }
    context.putImageData(pixels, 0, 0);
    this.draw();
  }

  /** The picture, and the mask over it in translucent red when painting is on. */
  draw() {
    const context = this.canvas.getContext("2d");
    context.clearRect(0, 0, this.canvas.width, this.canvas.height);
    if (this.picture) context.drawImage(this.picture, 0, 0);
    if (!this.enabled) return;
    const tint = document.createElement("canvas");
    tint.width = this.mask.width;
    tint.height = this.mask.height;
    const tinted = tint.getContext("2d");
    tinted.drawImage(this.mask, 0, 0);
    tinted.globalCompositeOperation = "source-in";
    tinted.fillStyle = "rgba(255, 40, 40, 0.55)";
    tinted.fillRect(0, 0, tint.width, tint.height);
    context.drawImage(tint, 0, 0);
    this.drawCursor(context);
  }

  /** Outlines the keyboard brush while the canvas has focus. */
  drawCursor(context) {
    if (!this.cursor || document.activeElement !== this.canvas) return;
    context.strokeStyle = "yellow";
    context.lineWidth = 1;
    context.beginPath();
    context.arc(this.cursor[0], this.cursor[1], this.brush / 2, 0, 2 * Math.PI);
    context.stroke();
  }

  /** Share of the picture that is masked, 0…1. */
  coverage() {
    const data = this.mask.getContext("2d").getImageData(0, 0, this.mask.width, this.mask.height).data;
    let painted = 0;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 127) painted++;
    return painted / (data.length / 4 || 1);
  }

  /** The mask as a PNG blob: black = keep, white = repaint. */
  toPng() {
    const out = document.createElement("canvas");
    out.width = this.mask.width;
    out.height = this.mask.height;
    const context = out.getContext("2d");
    context.fillStyle = "black";
    context.fillRect(0, 0, out.width, out.height);
    context.drawImage(this.mask, 0, 0);
    return new Promise((resolve) => out.toBlob(resolve, "image/png"));
  }
}
