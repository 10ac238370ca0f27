/**
 * Why Parley's server spends its GC time copying objects that are already dead: how much of what a loop
 * allocates survives a young-generation GC (scavenge), per shape of code. Each case runs in its own
 * `node --trace-gc-nvp` process; the scavenge lines give bytes allocated, surviving and the pause.
 * Usage: npm run bench:gc  (about a minute; prints a markdown table)
 */
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { createContextValues, createConnectRouter } from "@connectrpc/connect";
import { pipe, transformCatch, transformCatchFinally, transformPrepend, transformReadAllBytes } from "@connectrpc/connect/protocol";
import { Health, HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";

const iterations = 100_000;

function payload(i: number): object[] {
  return Array.from({ length: 20 }, (_, j) => ({ i, j }));
}

async function* passOn<T>(source: AsyncIterable<T>): AsyncIterable<T> {
  for await (const value of source) yield value;
}

async function* once<T>(value: T): AsyncIterable<T> {
  yield value;
}

async function drain(iterable: AsyncIterable<unknown>): Promise<void> {
  for await (const _ of iterable) { /* consume */ }
}

const healthCheck = createConnectRouter().service(Health, {
  check: () => ({ status: HealthCheckResponse_ServingStatus.SERVING }),
  async *watch() { /* unused */ },
}).handlers.find((h) => h.method.name === "Check")!;
const emptyRequestEnvelope = new Uint8Array(5);

/** Each case does one unit of work per iteration; nothing outlives its iteration. */
const cases: Record<string, { label: string; run: (i: number) => Promise<unknown> | unknown }> = {
  "async-generator-declared-once": {
    label: "4 chained async generators, each declared once at module level",
    run: (i) => drain(passOn(passOn(passOn(passOn(once(payload(i))))))),
  },
  "async-generator-closure-per-call": {
    label: "the same 4 stages as async generator closures created per call, taking their source as a parameter",
    run: (i) => {
      const stage = <T>() => async function* (source: AsyncIterable<T>) { for await (const v of source) yield v; };
      return drain(stage()(stage()(stage()(stage()(once(payload(i)))))));
    },
  },
  "async-generator-closure-capturing-source": {
    label: "the same 4 stages as per-call closures that capture their source (as a down-levelled async generator does)",
    run: (i) => {
      const stage = <T>(source: AsyncIterable<T>) => (async function* () { for await (const v of source) yield v; })();
      return drain(stage(stage(stage(stage(once(payload(i)))))));
    },
  },
  "class-per-call": {
    label: "a class declared per call that captures the payload, instantiated once",
    run: (i) => {
      const data = payload(i);
      class PerCall { size = data.length; }
      return new PerCall();
    },
  },
  "connect-pipe": {
    label: "Connect's pipe() with 4 of its transforms (its published ES2017 build)",
    run: (i) => drain(pipe(
      once<Uint8Array>(new Uint8Array(i % 64)),
      transformPrepend<Uint8Array>(() => undefined),
      transformCatch<Uint8Array>((e) => { throw e; }),
      transformCatchFinally<Uint8Array>(() => undefined),
      transformReadAllBytes(1024),
    )),
  },
  "connect-unary-handler": {
    label: "Connect's gRPC handler for one unary call (Health/Check), in memory, no HTTP",
    run: async () => {
      const response = await healthCheck({
        httpVersion: "2.0",
        method: "POST",
        url: "http://localhost/grpc.health.v1.Health/Check",
        header: new Headers({ "content-type": "application/grpc", te: "trailers" }),
        body: once(emptyRequestEnvelope),
        signal: new AbortController().signal,
        contextValues: createContextValues(),
      });
      if (response.body) await drain(response.body as AsyncIterable<Uint8Array>);
    },
  },
};

interface Measured { name: string; label: string; kibPerIteration: number; survivingPercent: number; scavenges: number; meanPauseMs: number; microsPerIteration: number }

function measure(name: string): Measured {
  const child = spawnSync(process.execPath, ["--import", "tsx", "--trace-gc-nvp", fileURLToPath(import.meta.url), name], { encoding: "utf8", maxBuffer: 256 << 20 });
  if (child.status !== 0) throw new Error(`${name}: ${child.stderr}`);
  let allocated = 0, survived = 0, pause = 0, scavenges = 0;
  // Only the timed loop counts (the child prints a marker after its warm-up).
  const lines = child.stdout.slice(child.stdout.indexOf("measure-start")).split("\n");
  for (const line of lines.filter((l) => / gc=s /.test(l))) {
    const field = (key: string) => Number(new RegExp(`\\b${key}=([\\d.]+)`).exec(line)?.[1] ?? 0);
    allocated += field("allocated");
    survived += field("new_space_survived");
    pause += field("pause");
    scavenges++;
  }
  const micros = Number(/measure-end (\d+(?:\.\d+)?)/.exec(child.stdout)?.[1]);
  return {
    name, label: cases[name]!.label,
    kibPerIteration: allocated / iterations / 1024,
    survivingPercent: allocated ? (100 * survived) / allocated : 0,
    scavenges, meanPauseMs: scavenges ? pause / scavenges : 0,
    microsPerIteration: micros,
  };
}

async function runCase(name: string): Promise<void> {
  const { run } = cases[name]!;
  for (let i = 0; i < 10_000; i++) await run(i);
  console.log("measure-start");
  const start = performance.now();
  for (let i = 0; i < iterations; i++) await run(i);
  console.log(`measure-end ${(((performance.now() - start) * 1000) / iterations).toFixed(1)}`);
}

const caseName = process.argv[2];
if (caseName) {
  await runCase(caseName);
} else {
  console.log(`Node ${process.version}, V8 ${process.versions.v8}; ${iterations.toLocaleString("en")} iterations per case after 10,000 warm-up.\n`);
  console.log("| code | KiB allocated per iteration | surviving a scavenge | scavenges | mean scavenge pause ms | µs per iteration |");
  console.log("|---|---:|---:|---:|---:|---:|");
  for (const name of Object.keys(cases)) {
    const m = measure(name);
    console.log(`| ${m.label} | ${m.kibPerIteration.toFixed(1)} | ${m.survivingPercent.toFixed(1)}% | ${m.scavenges} | ${m.meanPauseMs.toFixed(2)} | ${m.microsPerIteration} |`);
  }
}
