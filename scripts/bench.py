#!/usr/bin/env python3
"""Side-by-side benchmark of denoised against the Python reference on the same ONNX export.

Three engines run the same export with the same threads, steps, guidance, size and prompt:
  * optimum: ORTStableDiffusionPipeline(...) called in a loop, plus PNG encoding of the picture;
  * raw: the text encoder, the U-Net (as many calls as the scheduler makes) and the VAE decoder run back to
    back through onnxruntime's Python API with nothing else (the floor any server pays);
  * denoised: the release binary over HTTP on loopback, as a client sees it: POST /v1/images, follow the
    job's server-sent events to `completed`, GET the image bytes.
optimum and raw each run in their own process (so each one's memory can be read); single-job latencies are
interleaved (one run of each engine in turn), so a slower or busier moment of the machine hits all three.

Then denoised alone: throughput with 1, 4 and 8 concurrent clients (its default worker layout), submissions per
second under wrk with a worker running, and the resident memory of 1,000 concurrent event followers.

Run it through scripts/bench (which makes the pinned Python environment and the release build).
"""

import argparse
import asyncio
import http.client
import io
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a large red circle center on a blue background"
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle"]
POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]


def fresh_prompt(i):
    """The `i`-th of 216 distinct prompts in the default model's words (no text-encoder cache can help)."""
    colour, shape, position = COLOURS[i % 8], SHAPES[(i // 8) % 3], POSITIONS[(i // 24) % 9]
    background = COLOURS[(i + 3) % 8]
    return f"a small {colour} {shape} {position} on a {background} background"


# ---------------------------------------------------------------- reference engines, each in its own process


def rss_mib(pid="self"):
    """Resident and peak resident memory of a process, in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    value = lambda key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1)) / 1024
    return value("VmRSS"), value("VmHWM")


def session_options(threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options


def optimum_engine(conn, model, threads, steps, guidance, size):
    """optimum's pipeline: the call and the PNG encoding of its picture."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    torch.set_num_threads(threads)
    pipe = ORTStableDiffusionPipeline.from_pretrained(
        model, provider="CPUExecutionProvider", session_options=session_options(threads), local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    seed = 0
    conn.send(("ready", rss_mib()))
    while (message := conn.recv()) != "stop":
        seed += 1
        started = time.perf_counter()
        image = pipe(
            message,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        image.save(io.BytesIO(), format="PNG")
        conn.send((time.perf_counter() - started, rss_mib()))


def raw_engine(conn, model, threads, steps, guidance, size):
    """The sessions alone: text encoder (uncond + cond), the U-Net as many times as the scheduler calls it on
    the guidance batch, the VAE decoder: no scheduler arithmetic, no tokenizer, no picture encoding."""
    import diffusers
    import numpy as np
    import onnxruntime as ort

    config = json.loads((Path(model) / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    scheduler.set_timesteps(steps)
    calls = len(scheduler.timesteps)
    options = session_options(threads)
    provider = ["CPUExecutionProvider"]
    text = ort.InferenceSession(str(Path(model) / "text_encoder" / "model.onnx"), options, providers=provider)
    unet = ort.InferenceSession(str(Path(model) / "unet" / "model.onnx"), options, providers=provider)
    vae = ort.InferenceSession(str(Path(model) / "vae_decoder" / "model.onnx"), options, providers=provider)
    unet_config = json.loads((Path(model) / "unet" / "config.json").read_text())
    vae_config = json.loads((Path(model) / "vae_decoder" / "config.json").read_text())
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    channels = unet_config["in_channels"]
    batch = 2 if guidance > 1 else 1
    ids_type = {"tensor(int32)": np.int32}.get(text.get_inputs()[0].type, np.int64)
    ids = np.zeros((batch, 77), dtype=ids_type)
    timestep_input = next(i for i in unet.get_inputs() if i.name == "timestep")
    timestep_type = np.int64 if "int64" in timestep_input.type else np.float32
    timestep = np.full((batch,) if timestep_input.shape else (), 999, dtype=timestep_type)
    latents = np.random.default_rng(0).standard_normal((1, channels, size // factor, size // factor)).astype(np.float32)
    conn.send(("ready", rss_mib(), calls))
    while conn.recv() != "stop":
        started = time.perf_counter()
        hidden = text.run(None, {text.get_inputs()[0].name: ids})[0]
        sample = np.concatenate([latents] * batch)
        for _ in range(calls):
            unet.run(None, {"sample": sample, "timestep": timestep, "encoder_hidden_states": hidden})
        vae.run(None, {"latent_sample": latents})
        conn.send((time.perf_counter() - started, rss_mib()))


class Engine:
    """A reference engine in a child process."""

    def __init__(self, target, *args):
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=target, args=(child, *args), daemon=True)
        self.process.start()
        ready = self.conn.recv()
        self.loaded_rss = ready[1][0]
        self.extra = ready[2:]
        self.peak = 0.0

    def run(self, prompt=PROMPT):
        self.conn.send(prompt)
        elapsed, (rss, peak) = self.conn.recv()
        self.peak = max(self.peak, peak)
        return elapsed

    def close(self):
        self.conn.send("stop")
        self.process.join(timeout=30)


# ---------------------------------------------------------------- denoised over HTTP


class Server:
    """The denoised release binary with a config of its own and a fresh data folder."""

    def __init__(self, binary, model, workers, max_batch, extra=""):
        self.dir = tempfile.TemporaryDirectory(prefix="denoised-bench-")
        data = Path(self.dir.name)
        worker_tables = "".join(
            f'[[workers]]\ndevice = "cpu"\ncount = {count}\nthreads = {threads}\nmax_batch = {max_batch}\n'
            for count, threads in workers
        )
        (data / "config.toml").write_text(
            f"""
[server]
bind = "127.0.0.1:0"
max_connections = 4096
[storage]
data_dir = "{data}"
database_url = "sqlite://{data}/denoised.db"
retention_hours = 0
[runtime]
onnxruntime_library = "{ROOT / '.ort/libonnxruntime.so'}"
[queue]
max_queued = 10000000
{extra}
[telemetry]
log = "warn,denoised::server=info"
[[models]]
name = "bench"
path = "{model}"
{worker_tables}"""
        )
        self.process = subprocess.Popen(
            [binary, "serve", "--config", str(data / "config.toml")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        address = None
        for line in self.process.stderr:
            found = re.search(r"addr=(\S+)", line)
            if found:
                address = found.group(1)
                break
        if address is None:
            raise SystemExit("denoised did not start")
        threading.Thread(target=lambda: [None for _ in self.process.stderr], daemon=True).start()
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.base = f"http://{address}"

    def rss(self):
        return rss_mib(self.process.pid)

    def close(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.dir.cleanup()


def generate(server, steps, guidance, size, seed, prompt=PROMPT):
    """One job as a client sees it: POST, the events until `completed`, the image bytes. Returns seconds."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(server.host, server.port, timeout=300)
    # No step previews: the references render none (a followed job renders one every tenth of its steps by
    # default).
    body = json.dumps({
        "prompt": prompt, "steps": steps, "guidance_scale": guidance, "width": size, "height": size, "seed": seed,
        "preview_every": 0,
    })
    connection.request("POST", "/v1/images", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    job = json.loads(response.read())
    if response.status != 202:
        raise SystemExit(f"POST /v1/images answered {response.status}: {job}")
    connection.request("GET", f"/v1/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"})
    events = connection.getresponse()
    event, images = None, None
    while True:
        line = events.fp.readline().decode()
        if not line:
            raise SystemExit(f"the event stream of {job['id']} ended before the job did")
        line = line.rstrip("\r\n")
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:") and event in ("completed", "failed", "cancelled"):
            if event != "completed":
                raise SystemExit(f"job {job['id']}: {event} {line}")
            images = json.loads(line[5:])["images"]
            break
    connection.close()
    connection = http.client.HTTPConnection(server.host, server.port, timeout=300)
    for image in images:
        connection.request("GET", image["url"])
        picture = connection.getresponse().read()
        assert picture[:4] == b"\x89PNG", "not a PNG"
    connection.close()
    return time.perf_counter() - started


def throughput(server, clients, jobs_each, steps, guidance, size):
    """Jobs per second with `clients` clients each running `jobs_each` jobs back to back, each job with a
    prompt of its own."""
    errors = []

    def client(index):
        try:
            for j in range(jobs_each):
                n = jobs_each * index + j
                generate(server, steps, guidance, size, seed=1000 * index + j, prompt=fresh_prompt(n))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return clients * jobs_each / (time.perf_counter() - started)


def submissions(server, seconds, connections, steps):
    """wrk POSTing jobs for `seconds` with `connections` connections: (requests/s, p50 ms, p99 ms, non-2xx)."""
    script = Path(server.dir.name) / "post.lua"
    body = json.dumps({"prompt": PROMPT, "steps": steps})
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), f"{server.base}/v1/images"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label):
        found = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(found.group(1)), found.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rate, ms("50"), ms("99"), int(bad.group(1)) if bad else 0


async def followers(server, count, steps, size):
    """Resident memory of the server with `count` clients following one running job's events."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
    body = json.dumps({"prompt": PROMPT, "steps": steps, "n": 8, "width": size, "height": size, "preview_every": 1})
    connection.request("POST", "/v1/images", body, {"Content-Type": "application/json"})
    job = json.loads(connection.getresponse().read())
    before = server.rss()[0]
    streams = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(f"GET /v1/jobs/{job['id']}/events HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n".encode())
        streams.append((reader, writer))
    for reader, _ in streams:
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=60)
    received = [0] * count

    async def drain(i, reader):
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            received[i] += len(chunk)

    tasks = [asyncio.create_task(drain(i, r)) for i, (r, _) in enumerate(streams)]
    peak = before
    while not all(t.done() for t in tasks):
        peak = max(peak, server.rss()[0])
        await asyncio.sleep(0.05)
    for _, writer in streams:
        writer.close()
    return before, peak, min(received)


# ---------------------------------------------------------------- the run


def median_ms(samples):
    return statistics.median(samples) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default=str(ROOT / "target/release/denoised"))
    parser.add_argument("--model", default=str(ROOT / "models/tiny-shapes"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--reps", type=int, default=15, help="interleaved single-job runs of each engine")
    parser.add_argument("--jobs-per-client", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument("--followers", type=int, default=1000)
    parser.add_argument("--out", default=str(ROOT / "target/bench/results.json"))
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    shape = (args.model, args.threads, args.steps, args.guidance, args.size)
    print(f"model {args.model}, {args.size}x{args.size}, {args.steps} steps, guidance {args.guidance}, "
          f"{args.threads} threads, {os.cpu_count()} cores ({platform.processor() or platform.machine()})", flush=True)

    # 1. Single-job latency, interleaved. denoised: one worker with all the threads, like the others.
    optimum = Engine(optimum_engine, *shape)
    raw = Engine(raw_engine, *shape)
    # The sessions on one thread: what one job costs one core, so cores / this is the most jobs per second
    # any server can finish on this machine without batching.
    raw_one = Engine(raw_engine, args.model, 1, args.steps, args.guidance, args.size)
    single = Server(args.binary, args.model, [(1, args.threads)], 1)
    times = {"optimum": [], "raw": [], "denoised": []}
    fresh = {"optimum": [], "raw": [], "denoised": [], "raw_one_thread": []}
    for engine in (optimum, raw, raw_one):
        engine.run()  # warm-up
    generate(single, args.steps, args.guidance, args.size, 0)
    for rep in range(args.reps):
        # The same prompt every time (denoised's text-encoder cache answers it) ...
        times["optimum"].append(optimum.run())
        times["raw"].append(raw.run())
        times["denoised"].append(generate(single, args.steps, args.guidance, args.size, rep + 1))
        # ... and a prompt never seen before.
        prompt = fresh_prompt(rep)
        fresh["optimum"].append(optimum.run(prompt))
        fresh["raw"].append(raw.run(prompt))
        fresh["denoised"].append(generate(single, args.steps, args.guidance, args.size, rep + 1, prompt))
        fresh["raw_one_thread"].append(raw_one.run(prompt))
    single_rss = single.rss()
    single.close()
    latency = {name: median_ms(samples) for name, samples in times.items()}
    latency_fresh = {name: median_ms(samples) for name, samples in fresh.items()}
    print(f"single job (median of {args.reps}): " + ", ".join(f"{k} {v:.1f} ms" for k, v in latency.items()), flush=True)
    print("single job, new prompts: " + ", ".join(f"{k} {v:.1f} ms" for k, v in latency_fresh.items()), flush=True)
    optimum_rate = 1000 / latency_fresh["optimum"]
    memory = {"optimum": optimum.peak, "raw": raw.peak}
    optimum.close()
    raw.close()
    raw_one.close()
    ceiling = args.threads * 1000 / latency_fresh["raw_one_thread"]

    # 2. Throughput with the default worker layout ("auto": one single-thread worker per core), batching on.
    layout = [(args.threads, 1)]
    server = Server(args.binary, args.model, layout, args.max_batch)
    generate(server, args.steps, args.guidance, args.size, 0)
    rates = {}
    for clients in (1, 4, 8):
        rates[clients] = throughput(server, clients, args.jobs_per_client, args.steps, args.guidance, args.size)
        print(f"{clients} clients: {rates[clients]:.1f} jobs/s", flush=True)
    memory["denoised"] = server.rss()[1]
    server.close()

    # 3. Submissions under wrk, a worker running (its jobs pile up in the queue).
    server = Server(args.binary, args.model, layout, args.max_batch)
    submitted = submissions(server, args.wrk_seconds, 32, args.steps)
    server.close()
    print(f"submissions: {submitted[0]:.0f}/s, p50 {submitted[1]:.2f} ms, p99 {submitted[2]:.2f} ms, "
          f"non-2xx {submitted[3]}", flush=True)

    # 4. Event followers.
    server = Server(args.binary, args.model, layout, args.max_batch)
    before, peak, least = asyncio.run(followers(server, args.followers, 150, args.size))
    server.close()
    print(f"{args.followers} followers: resident {before:.0f} MiB before, {peak:.0f} MiB at most "
          f"(each received at least {least} bytes)", flush=True)

    def latency_row(label, measured):
        return (label, f"{measured['denoised']:.1f}", f"{measured['optimum']:.1f}", f"{measured['raw']:.1f}",
                f"{measured['denoised'] / measured['optimum']:.2f}× optimum, "
                f"{measured['denoised'] / measured['raw']:.3f}× raw")

    overhead = latency_fresh["denoised"] - latency_fresh["raw"]
    rows = [
        latency_row("single job, the same prompt each time, median (ms)", latency),
        latency_row("single job, a new prompt each time, median (ms)", latency_fresh),
        ("per-job overhead over raw sessions, new prompts (ms)", f"{overhead:.1f}",
         f"{latency_fresh['optimum'] - latency_fresh['raw']:.1f}", "0", f"{100 * overhead / latency_fresh['raw']:.1f} % of raw"),
    ]
    for clients in (1, 4, 8):
        rows.append((f"throughput, {clients} client{'s' if clients > 1 else ''}, new prompts (jobs/s)", f"{rates[clients]:.1f}",
                     f"{optimum_rate:.1f} back to back", "", f"{rates[clients] / optimum_rate:.2f}× optimum"))
    rows.append(("ceiling without batching: cores / one-thread raw session time (jobs/s)", f"{ceiling:.1f}", "", "",
                 f"{latency_fresh['raw_one_thread']:.1f} ms per job on one core"))
    rows.append(("submissions/s under wrk (32 connections), p50 / p99", f"{submitted[0]:.0f}, {submitted[1]:.1f} / "
                 f"{submitted[2]:.1f} ms", "", "", f"{submitted[3]} non-2xx; the queue grew to about "
                 f"{submitted[0] * args.wrk_seconds:.0f} jobs"))
    rows.append(("peak resident memory (MiB)", f"{memory['denoised']:.0f}", f"{memory['optimum']:.0f}",
                 f"{memory['raw']:.0f}", "denoised: throughput runs"))
    rows.append((f"{args.followers} event followers, resident memory (MiB)", f"{before:.0f} → {peak:.0f}", "", "", ""))
    print()
    print("| workload | denoised | optimum | raw ONNX Runtime | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "args": vars(args), "latency_ms": latency, "latency_new_prompts_ms": latency_fresh, "samples_s": times,
        "samples_new_prompts_s": fresh, "throughput": rates,
        "optimum_back_to_back": optimum_rate, "submissions": submitted, "memory_mib": memory,
        "single_server_rss_mib": single_rss, "followers": [before, peak, least],
    }, indent=2))


if __name__ == "__main__":
    main()
