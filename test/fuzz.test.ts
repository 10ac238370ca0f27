// Hostile input: a seeded, bounded fuzz of every RPC over Connect JSON, Connect binary, gRPC and
// gRPC-Web (random and mutated bodies and headers), oversized and compressed-bomb requests, malformed
// tokens, hostile user ids, and broken HTTP/1.1 and HTTP/2 connections. The server runs as a child
// process, so a crash is seen as such. It must answer with an allowed code (never INTERNAL, UNKNOWN or
// DATA_LOSS), never leak internals (stack traces, SQL, file paths), and stay healthy.
//
// FUZZ_SEED=<n> replays a run; FUZZ_ITERATIONS=<n> sets the number of random requests (default 1600).
import crypto from "node:crypto";
import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import zlib from "node:zlib";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { create, toBinary, toJsonString, type DescMessage, type DescMethod, type DescService } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { SignJWT } from "jose";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import { ServerReflection as ReflectionV1 } from "../gen/grpc/reflection/v1/reflection_pb.js";
import { ServerReflection as ReflectionV1alpha } from "../gen/grpc/reflection/v1alpha/reflection_pb.js";
import { ChatService } from "../gen/parley/v1/chat_pb.js";
import { MemberService } from "../gen/parley/v1/member_pb.js";
import { MessageService } from "../gen/parley/v1/message_pb.js";
import { NotificationService, type Notification } from "../gen/parley/v1/notification_pb.js";
import { parleyClient, protocols, type ParleyClient } from "./support/clients.js";
import { exitSoonAfterSummary, freePort, readable, parleyEnv, sleep, startParleyProcess, tempDir, type ParleyProcess } from "./support/processes.js";
import {
  createTestDatabase, describeBackends, TEST_SECRET, testDatabaseUrl, testNatsUrl, tokenFor, uniqueTenant,
} from "./support/server.js";
import { StreamReader } from "./support/streams.js";

/** uvu prints errors that carry a `details` field (as ConnectError does) as an empty diff: rethrow those readably. */
const it = (name: string, fn: () => Promise<void>) =>
  test(name, async () => {
    try {
      await fn();
    } catch (error) {
      throw readable(error);
    }
  });

const SEED = Number(process.env.FUZZ_SEED ?? 20240611) >>> 0;
const ITERATIONS = Number(process.env.FUZZ_ITERATIONS ?? 1600);
console.log(`fuzz suite — ${describeBackends()}; seed ${SEED} (FUZZ_SEED=${SEED} replays it), ${ITERATIONS} random requests`);

// ---------------------------------------------------------------------------------------------
// Seeded randomness

class Rng {
  constructor(private state: number) {}
  /** mulberry32 */
  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }
  bytes(n: number): Buffer {
    const out = Buffer.alloc(n);
    for (let i = 0; i < n; i++) out[i] = this.int(256);
    return out;
  }
}

// ---------------------------------------------------------------------------------------------
// Hostile values

const SQLISH = [
  "'; DROP TABLE messages; --", "' OR '1'='1", "1 OR 1=1", "\"; DELETE FROM chats WHERE ''='", "' UNION SELECT * FROM members --",
  "$1", "$$ $$", "\\x00", "%' AND 1=0 --", "'); COMMIT; BEGIN; --", "E'\\\\'", "pg_sleep(10)", "; SELECT pg_sleep(10);--",
];
const WEIRD = [
  "", " ", "a.b", "*", ">", "a b", "ü", "😀🚀", "日本語", "a\u200bb", "\u202e", "\ud800", "\udfff", "\ufffd", "\u0000", "\t", "\n",
  "x".repeat(129), "é".repeat(128), "../../etc/passwd", "%2e%2e%2f", "${jndi:ldap://x}", "{{7*7}}", "<script>", "null", "undefined",
  "0", "-1", "NaN", "true", "[]", "{}", ...SQLISH,
];
const INT64S = ["0", "-1", "1", "9223372036854775807", "-9223372036854775808", "9223372036854775808", "18446744073709551615", "1e3", "1.5", "0x10", " 1", ""];
const NUMBERS = [0, -1, 1, 2147483647, -2147483648, 2147483648, 4294967296, 1e308, -1e308, 0.5, Number.MAX_SAFE_INTEGER];
const TIMES = ["1970-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999999Z", "0000-01-01T00:00:00Z",
  "10000-01-01T00:00:00Z", "2024-02-30T00:00:00Z", "not a time", "2024-01-01T00:00:00+99:00", ""];

function randomString(rng: Rng): string {
  switch (rng.int(5)) {
    case 0: return rng.pick(WEIRD);
    case 1: return rng.pick(SQLISH);
    case 2: return Array.from({ length: rng.int(40) }, () => String.fromCodePoint(rng.int(0x11000))).join("").replace(/[\ud800-\udfff]/g, "?");
    case 3: return "z".repeat(rng.pick([200, 201, 4096, 4097, 70_000]));
    default: return crypto.randomUUID();
  }
}

function randomJsonValue(rng: Rng, depth = 0): unknown {
  const kind = rng.int(depth > 3 ? 5 : 7);
  switch (kind) {
    case 0: return null;
    case 1: return rng.chance(0.5);
    case 2: return rng.pick(NUMBERS);
    case 3: return randomString(rng);
    case 4: return rng.pick(INT64S);
    case 5: return Array.from({ length: rng.int(4) }, () => randomJsonValue(rng, depth + 1));
    default: {
      const o: Record<string, unknown> = {};
      for (let i = rng.int(4); i > 0; i--) o[rng.pick(["chatId", "text", "name", "memberIds", "pageSize", "order", "afterSequence", "x", "__proto__", "constructor"])] = randomJsonValue(rng, depth + 1);
      return o;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Protobuf helpers

function varint(value: bigint): Buffer {
  const out: number[] = [];
  let v = BigInt.asUintN(64, value);
  do {
    let byte = Number(v & 0x7fn);
    v >>= 7n;
    if (v > 0n) byte |= 0x80;
    out.push(byte);
  } while (v > 0n);
  return Buffer.from(out);
}

function randomField(rng: Rng): Buffer {
  const field = BigInt(rng.pick([1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 100, 536870911, 0]));
  const wire = rng.int(8);
  const tag = varint((field << 3n) | BigInt(wire));
  switch (wire) {
    case 0: return Buffer.concat([tag, rng.chance(0.2) ? Buffer.alloc(11, 0xff) : varint(BigInt(rng.pick(INT64S.filter((s) => /^-?\d+$/.test(s)))))]);
    case 1: return Buffer.concat([tag, rng.bytes(8)]);
    case 2: {
      const payload = rng.chance(0.5) ? Buffer.from(rng.pick(WEIRD), "utf8") : rng.bytes(rng.int(20));
      const declared = rng.chance(0.2) ? BigInt(payload.length + rng.int(1000) + 1) : BigInt(payload.length);
      return Buffer.concat([tag, varint(declared), payload]);
    }
    case 5: return Buffer.concat([tag, rng.bytes(4)]);
    default: return Buffer.concat([tag, rng.bytes(rng.int(6))]); // groups and invalid wire types
  }
}

function mutateBinary(rng: Rng, valid: Buffer): Buffer {
  switch (rng.int(8)) {
    case 0: return rng.bytes(rng.int(64));
    case 1: {
      const out = Buffer.from(valid);
      for (let i = 1 + rng.int(4); i > 0 && out.length > 0; i--) out[rng.int(out.length)]! ^= 1 << rng.int(8);
      return out;
    }
    case 2: return valid.subarray(0, rng.int(valid.length + 1));
    case 3: {
      const at = rng.int(valid.length + 1);
      return Buffer.concat([valid.subarray(0, at), rng.bytes(1 + rng.int(8)), valid.subarray(at)]);
    }
    case 4: return Buffer.concat([valid, randomField(rng)]);
    case 5: return Buffer.concat([valid, valid]);
    case 6: return Buffer.concat([randomField(rng), randomField(rng), randomField(rng)]);
    default: return Buffer.concat([valid, Buffer.from([0x0a, 0x03, 0xff, 0xfe, 0xfd])]); // invalid UTF-8 in field 1
  }
}

function mutateJson(rng: Rng, valid: Record<string, unknown>): Buffer {
  switch (rng.int(9)) {
    case 0: return Buffer.from(JSON.stringify(randomJsonValue(rng)));
    case 1: {
      const o: Record<string, unknown> = { ...valid };
      const keys = Object.keys(o);
      const key = keys.length > 0 && rng.chance(0.8) ? rng.pick(keys) : rng.pick(["chatId", "pageToken", "startTime", "order", "memberIds", "bogus"]);
      o[key] = randomJsonValue(rng);
      return Buffer.from(JSON.stringify(o));
    }
    case 2: {
      const text = JSON.stringify(valid);
      return Buffer.from(text.slice(0, rng.int(text.length + 1)));
    }
    case 3: return rng.bytes(rng.int(48));
    case 4: return Buffer.from("[".repeat(5000) + "]".repeat(5000));
    case 5: return Buffer.from(`{"chatId":${JSON.stringify(valid.chatId ?? "")},"startTime":${JSON.stringify(rng.pick(TIMES))},"endTime":${JSON.stringify(rng.pick(TIMES))}}`);
    case 6: return Buffer.from(`{"pageSize":${rng.pick(NUMBERS)},"afterSequence":${JSON.stringify(rng.pick(INT64S))},"order":${JSON.stringify(rng.pick(["ORDER_BOGUS", 99, -1, "ORDER_OLDEST_FIRST", 2.5]))}}`);
    case 7: return Buffer.from(JSON.stringify({ ...valid, [rng.pick(["chat_id", "chatId", "text"])]: rng.pick(WEIRD) }) + rng.pick(["", "garbage", "}", "\u0000"]));
    default: return Buffer.from(`{"text":"\\ud800\\udc00\\ud800","name":"\\u0000","chatId":"\\"","memberIds":[${rng.pick(['"a",null', "1,2", '"\\udfff"', "{}"])}]}`);
  }
}

function envelope(payload: Buffer, flags = 0, declared = payload.length): Buffer {
  const head = Buffer.alloc(5);
  head[0] = flags;
  head.writeUInt32BE(declared >>> 0, 1);
  return Buffer.concat([head, payload]);
}

// ---------------------------------------------------------------------------------------------
// Answers: the code, the message, and what is allowed

const BAD_CODES = new Set(["internal", "unknown", "data_loss"]);
const CODE_NAMES = [
  "ok", "canceled", "unknown", "invalid_argument", "deadline_exceeded", "not_found", "already_exists", "permission_denied",
  "resource_exhausted", "failed_precondition", "aborted", "out_of_range", "unimplemented", "internal", "unavailable",
  "data_loss", "unauthenticated",
];
/** Internals that must never reach a client. The inputs above contain none of these. */
const LEAKS: [string, RegExp][] = [
  ["stack trace", /\n\s+at |\bat (?:async )?[\w.$<>]+ \(|\w+\.(?:ts|js|mjs|cjs):\d+/],
  ["file path", /\/work\/|node_modules|file:\/\/|\/src\/|\/usr\/|\/tmp\//],
  ["SQL error", /syntax error at or near|violates (?:unique|foreign key|check|not-null) constraint|invalid input syntax for|relation "|column "|tenant_id|ON CONFLICT|FOR UPDATE|duplicate key|out of range for type|current transaction is aborted/i],
  ["database or runtime internals", /postgres|pglite|ECONNREFUSED|TypeError|RangeError|ReferenceError|Cannot read propert|is not a function|undefined is not/i],
];

function leaks(message: string): string[] {
  return LEAKS.filter(([, re]) => re.test(message)).map(([what]) => what);
}

interface Answer {
  /** Canonical code name, "open" for a stream that started delivering, or "http <status>" for a non-RPC answer. */
  code: string;
  message: string;
}

const failures: string[] = [];
const seenCodes = new Map<string, number>();

function judge(what: string, answer: Answer | Error, allowed?: (code: string) => boolean): void {
  if (answer instanceof Error) {
    failures.push(`${what}: no answer (${answer.message})`);
    return;
  }
  seenCodes.set(answer.code, (seenCodes.get(answer.code) ?? 0) + 1);
  const bad = BAD_CODES.has(answer.code) || /^http 5/.test(answer.code) || (allowed !== undefined && !allowed(answer.code));
  const leaked = leaks(answer.message);
  if (bad || leaked.length > 0) {
    failures.push(`${what}: ${answer.code} "${answer.message.slice(0, 300)}"${leaked.length ? ` — leaks ${leaked.join(", ")}` : ""}`);
  }
}

/** Failures grouped by kind (transport, method, code and message without numbers): "count × first example". */
function summarize(found: string[]): string[] {
  const groups = new Map<string, { count: number; example: string }>();
  for (const f of found) {
    const key = f.replace(/^#\d+ /, "").replace(/\d+/g, "N");
    const g = groups.get(key) ?? { count: 0, example: f };
    g.count++;
    groups.set(key, g);
  }
  return [...groups.values()].map((g) => `${g.count} × ${g.example}`);
}

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<T>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms))),
  ]);
}

const agent = new http.Agent({ keepAlive: true, maxSockets: 8 });

/** HTTP/1.1: Connect unary and streaming, gRPC-Web. Streams that start delivering are cut off. */
function http1Call(url: string, path: string, headers: Record<string, string>, body: Buffer, kind: "connect-unary" | "connect-stream" | "grpc-web"): Promise<Answer> {
  return withTimeout(new Promise<Answer>((resolve, reject) => {
    const req = http.request(`${url}${path}`, { method: "POST", headers: { ...headers, "content-length": String(body.length) }, agent }, (res) => {
      const status = res.statusCode ?? 0;
      let data = Buffer.alloc(0);
      const finish = (answer: Answer) => {
        resolve(answer);
        res.destroy();
      };
      if (kind === "grpc-web" && res.headers["grpc-status"] !== undefined) {
        return finish({ code: CODE_NAMES[Number(res.headers["grpc-status"])] ?? `grpc ${res.headers["grpc-status"]}`, message: decodeURIComponent(String(res.headers["grpc-message"] ?? "")) });
      }
      res.on("data", (chunk: Buffer) => {
        data = Buffer.concat([data, chunk]);
        if (status !== 200 || kind === "connect-unary") return;
        while (data.length >= 5) {
          const length = data.readUInt32BE(1);
          if (data.length < 5 + length) return;
          const flags = data[0]!;
          const frame = data.subarray(5, 5 + length);
          data = data.subarray(5 + length);
          if (kind === "connect-stream" && flags & 0x02) {
            const end = JSON.parse(frame.toString("utf8")) as { error?: { code?: string; message?: string } };
            return finish(end.error ? { code: end.error.code ?? "unknown", message: end.error.message ?? "" } : { code: "ok", message: "" });
          }
          if (kind === "grpc-web" && flags & 0x80) {
            const trailers = Object.fromEntries(frame.toString("latin1").split("\r\n").filter(Boolean).map((l) => {
              const i = l.indexOf(":");
              return [l.slice(0, i).trim().toLowerCase(), l.slice(i + 1).trim()];
            }));
            return finish({ code: CODE_NAMES[Number(trailers["grpc-status"])] ?? `grpc ${trailers["grpc-status"]}`, message: decodeURIComponent(trailers["grpc-message"] ?? "") });
          }
          return finish({ code: "open", message: "" });
        }
      });
      res.on("end", () => {
        if (kind === "connect-unary" || status !== 200) {
          const text = data.toString("utf8");
          if (status === 200) return resolve({ code: "ok", message: "" });
          try {
            const error = JSON.parse(text) as { code?: string; message?: string };
            return resolve({ code: error.code ?? `http ${status}`, message: error.message ?? "" });
          } catch {
            return resolve({ code: `http ${status}`, message: text });
          }
        }
        resolve({ code: "ended without end-of-stream", message: data.toString("latin1").slice(0, 200) });
      });
      res.on("error", () => resolve({ code: "canceled", message: "" }));
    });
    req.on("error", reject);
    req.end(body);
  }), 8000, `${kind} ${path}`);
}

let h2session: http2.ClientHttp2Session | undefined;
function h2(url: string): http2.ClientHttp2Session {
  if (!h2session || h2session.closed || h2session.destroyed) {
    h2session = http2.connect(url);
    h2session.on("error", () => {});
  }
  return h2session;
}

/** gRPC over HTTP/2: the grpc-status of the answer, or "open" once a stream delivers a message. */
function grpcCall(url: string, path: string, headers: Record<string, string>, body: Buffer): Promise<Answer> {
  return withTimeout(new Promise<Answer>((resolve, reject) => {
    let req: http2.ClientHttp2Stream;
    try {
      req = h2(url).request({ ":method": "POST", ":path": path, ...headers });
    } catch (error) {
      return reject(error);
    }
    let data = Buffer.alloc(0);
    let status = 0;
    const done = (answer: Answer) => {
      resolve(answer);
      if (!req.closed) req.close(http2.constants.NGHTTP2_CANCEL);
    };
    const fromHeaders = (h: http2.IncomingHttpHeaders) => {
      if (h["grpc-status"] === undefined) return false;
      done({ code: CODE_NAMES[Number(h["grpc-status"])] ?? `grpc ${h["grpc-status"]}`, message: decodeURIComponent(String(h["grpc-message"] ?? "")) });
      return true;
    };
    req.on("response", (h) => {
      status = Number(h[":status"]);
      fromHeaders(h);
    });
    req.on("trailers", (h) => fromHeaders(h));
    req.on("data", (chunk: Buffer) => {
      data = Buffer.concat([data, chunk]);
      if (data.length >= 5 && data.length >= 5 + data.readUInt32BE(1)) done({ code: "open", message: "" });
    });
    req.on("close", () => done({ code: status && status !== 200 ? `http ${status}` : `reset ${req.rstCode}`, message: data.toString("latin1").slice(0, 200) }));
    req.on("error", () => {});
    req.end(body);
  }), 8000, `grpc ${path}`);
}

// ---------------------------------------------------------------------------------------------
// The server under test (a child process) and its data

let proc: ParleyProcess;
let cleanup: () => Promise<void> = async () => {};
let tenant: string;
let aliceToken: string;
let alice: ParleyClient;
let chatId: string;
let messageId: string;

test.before(async () => {
  const data = await tempDir("parley-fuzz-");
  const database = testDatabaseUrl ? await createTestDatabase(testDatabaseUrl) : undefined;
  cleanup = async () => {
    await database?.drop().catch(() => {});
    await data.remove();
  };
  proc = await startParleyProcess(parleyEnv({
    port: await freePort(), dataDir: data.dir, databaseUrl: database?.url, natsUrl: testNatsUrl,
    extra: { PARLEY_SEND_RATE: "1000000", PARLEY_SEND_BURST: "1000000", PARLEY_LOG_LEVEL: "warn" },
  }));
  tenant = uniqueTenant("fuzz");
  aliceToken = await tokenFor(tenant, "alice");
  alice = parleyClient(proc.url, aliceToken);
  const { chat } = await alice.chats.createChat({ name: "fuzz target", memberIds: ["bob"] });
  chatId = chat!.id;
  messageId = (await alice.messages.sendMessage({ chatId, text: "seed message" })).message!.id;
});

test.after(async () => {
  exitSoonAfterSummary();
  h2session?.destroy();
  agent.destroy();
  await proc?.stop(5000);
  await cleanup();
});

const SERVICES: DescService[] = [ChatService, MemberService, MessageService, NotificationService, Health, ReflectionV1, ReflectionV1alpha];

/** A plausible request for a method, so that mutations reach past decoding into the service. */
function validRequest(method: DescMethod) {
  const values: Record<string, unknown> = {};
  for (const field of method.input.fields) {
    const v = ({
      chatId, messageId, text: "hello", name: "room", memberIds: ["bob", "carol"], userIds: ["carol"], userId: "carol",
      pageSize: 10, sequence: 1n, afterSequence: 0n, includeMessages: true, clientMessageId: crypto.randomUUID(), service: "",
      listServices: "",
    } as Record<string, unknown>)[field.localName];
    if (v !== undefined) values[field.localName] = v;
  }
  if (method.input.typeName.endsWith("ServerReflectionRequest")) return create(method.input, { messageRequest: { case: "listServices", value: "" } } as never);
  return create(method.input, values as never);
}

function asJson(schema: DescMessage, message: ReturnType<typeof validRequest>): Record<string, unknown> {
  return JSON.parse(toJsonString(schema, message as never)) as Record<string, unknown>;
}

/** An HS256 JWS built by hand, for headers and claims a JWT library refuses to produce. */
function rawHs256(header: object, payload: object, secret = TEST_SECRET): string {
  const input = `${Buffer.from(JSON.stringify(header)).toString("base64url")}.${Buffer.from(JSON.stringify(payload)).toString("base64url")}`;
  return `${input}.${crypto.createHmac("sha256", secret).update(input).digest("base64url")}`;
}

const BAD_TOKENS = (() => {
  const header = (o: object) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return [
    "", "Bearer", "Bearer ", "Basic YWxpY2U6c2VjcmV0", "Bearer a", "Bearer a.b", "Bearer a.b.c", "Bearer ...", "Bearer 😀".normalize(),
    `Bearer ${header({ alg: "none", typ: "JWT" })}.${header({ sub: "alice", tid: "t" })}.`,
    `Bearer ${header({ alg: "HS256" })}.${Buffer.from("not json").toString("base64url")}.${"A".repeat(43)}`,
    `Bearer ${header({ alg: "HS256" })}.${Buffer.from("[1,2]").toString("base64url")}.${"A".repeat(43)}`,
    `Bearer ${"a".repeat(9000)}.${"b".repeat(100)}.${"c".repeat(43)}`,
  ].map((t) => t.replace(/[^\x20-\x7e]/g, "?"));
})();

function randomHeaders(rng: Rng, base: Record<string, string>): Record<string, string> {
  const h = { ...base };
  if (rng.chance(0.1)) h.authorization = rng.pick(BAD_TOKENS);
  if (rng.chance(0.03)) delete h.authorization;
  if (rng.chance(0.05)) h["content-type"] = rng.pick(["application/json; charset=utf-16", "application/proto;", "text/plain", "application/grpc+json", "application/connect+thrift", "application/x-www-form-urlencoded"]);
  if (rng.chance(0.05)) h["grpc-timeout"] = rng.pick(["abc", "99999999999H", "0n", "-1S", "1m"]);
  if (rng.chance(0.05)) h["connect-timeout-ms"] = rng.pick(["abc", "-5", "99999999999999999999", "0", "1"]);
  if (rng.chance(0.05)) h["grpc-encoding"] = rng.pick(["snappy", "gzip", "br", "identity", "deflate"]);
  if (rng.chance(0.05)) h["content-encoding"] = rng.pick(["snappy", "gzip", "br"]);
  if (rng.chance(0.05)) h["connect-protocol-version"] = rng.pick(["2", "0", "x"]);
  if (rng.chance(0.05)) h["x-request-id"] = rng.pick(["x".repeat(300), "a b", "../etc", "%00"]);
  return h;
}

// ---------------------------------------------------------------------------------------------

it("fuzz - random and mutated bodies and headers to every RPC (Connect JSON, Connect binary, gRPC, gRPC-Web): allowed codes only, nothing leaked", async () => {
  const rng = new Rng(SEED);
  const methods = SERVICES.flatMap((service) => service.methods.map((method) => ({ service, method })));
  const auth = { authorization: `Bearer ${aliceToken}` };
  const jobs: (() => Promise<void>)[] = [];
  for (let i = 0; i < ITERATIONS; i++) {
    const { service, method } = rng.pick(methods);
    const path = `/${service.typeName}/${method.name}`;
    const valid = Buffer.from(toBinary(method.input, validRequest(method) as never));
    const validJson = asJson(method.input, validRequest(method));
    const streaming = method.methodKind !== "unary";
    const bidi = method.methodKind === "bidi_streaming" || method.methodKind === "client_streaming";
    const transports = bidi ? ["grpc"] : ["connect-json", "connect-proto", "grpc", "grpc-web"];
    const transport = rng.pick(transports);
    const json = transport === "connect-json";
    let payload = json ? mutateJson(rng, validJson) : mutateBinary(rng, valid);
    if (rng.chance(0.05)) payload = json ? Buffer.from(JSON.stringify(validJson)) : valid;
    let what = `#${i} ${transport} ${method.name}`;
    jobs.push(async () => {
      let answer: Answer | Error;
      try {
        if (transport === "grpc") {
          const flags = rng.chance(0.05) ? rng.pick([1, 2, 0x80, 0xff]) : 0;
          const declared = Math.max(0, rng.chance(0.05) ? payload.length + rng.pick([-1, 1, 1000]) : payload.length);
          const headers = randomHeaders(rng, { ...auth, "content-type": "application/grpc", te: "trailers" });
          const odd = [flags ? `flags ${flags}` : "", declared !== payload.length ? "length mismatch" : "", headers["grpc-encoding"] ? `grpc-encoding ${headers["grpc-encoding"]}` : ""].filter(Boolean);
          if (odd.length > 0) what += ` [${odd.join(", ")}]`;
          answer = await grpcCall(proc.url, path, headers, envelope(payload, flags, declared));
        } else if (transport === "grpc-web") {
          answer = await http1Call(proc.url, path, randomHeaders(rng, { ...auth, "content-type": "application/grpc-web+proto" }), envelope(payload), "grpc-web");
        } else if (streaming) {
          const ct = json ? "application/connect+json" : "application/connect+proto";
          answer = await http1Call(proc.url, path, randomHeaders(rng, { ...auth, "content-type": ct, "connect-protocol-version": "1" }), envelope(payload), "connect-stream");
        } else {
          const ct = json ? "application/json" : "application/proto";
          answer = await http1Call(proc.url, path, randomHeaders(rng, { ...auth, "content-type": ct, "connect-protocol-version": "1" }), payload, "connect-unary");
        }
      } catch (error) {
        answer = error as Error;
      }
      judge(what, answer);
    });
  }
  // Eight at a time: enough concurrency to interleave, bounded for a 2-core machine.
  let next = 0;
  await Promise.all(Array.from({ length: 8 }, async () => {
    while (next < jobs.length) await jobs[next++]!();
  }));
  assert.ok(proc.running(), `the server is still running (exit ${proc.exitCode()})`);
  console.log(`  codes: ${[...seenCodes].sort((a, b) => b[1] - a[1]).map(([c, n]) => `${c} ${n}`).join(", ")}`);
  assert.equal(summarize(failures.splice(0)), [], `bad answers (seed ${SEED}), grouped: count × first example`);
});

it("fuzz - requests over PARLEY_MAX_REQUEST_BYTES (and decompression bombs) get RESOURCE_EXHAUSTED on every protocol", async () => {
  const MAX = 1024 * 1024;
  const auth = { authorization: `Bearer ${aliceToken}` };
  const big = create(MessageService.method.sendMessage.input, { chatId, text: "y".repeat(MAX + 1000) });
  const bigBinary = Buffer.from(toBinary(MessageService.method.sendMessage.input, big));
  const bigJson = Buffer.from(toJsonString(MessageService.method.sendMessage.input, big));
  const watchBig = Buffer.from(toBinary(MessageService.method.watchMessages.input, create(MessageService.method.watchMessages.input, { chatId })));
  const padded = Buffer.concat([watchBig, Buffer.from([0x7a]), varint(BigInt(MAX + 10)), Buffer.alloc(MAX + 10, 0x61)]); // unknown field 15
  const bomb = zlib.gzipSync(Buffer.alloc(64 * 1024 * 1024, 0x20)); // 64 MiB of spaces in ~64 KiB
  const bombProto = zlib.gzipSync(Buffer.concat([Buffer.from([0x12]), varint(BigInt(32 * 1024 * 1024)), Buffer.alloc(32 * 1024 * 1024, 0x61)]));
  const send = "/parley.v1.MessageService/SendMessage";
  const watch = "/parley.v1.MessageService/WatchMessages";
  const exhausted = (code: string) => code === "resource_exhausted";
  const cases: [string, () => Promise<Answer>, ((code: string) => boolean)?][] = [
    ["Connect JSON unary", () => http1Call(proc.url, send, { ...auth, "content-type": "application/json" }, bigJson, "connect-unary")],
    ["Connect binary unary", () => http1Call(proc.url, send, { ...auth, "content-type": "application/proto" }, bigBinary, "connect-unary")],
    ["Connect binary stream", () => http1Call(proc.url, watch, { ...auth, "content-type": "application/connect+proto" }, envelope(padded), "connect-stream")],
    ["gRPC unary", () => grpcCall(proc.url, send, { ...auth, "content-type": "application/grpc", te: "trailers" }, envelope(bigBinary))],
    ["gRPC stream", () => grpcCall(proc.url, watch, { ...auth, "content-type": "application/grpc", te: "trailers" }, envelope(padded))],
    ["gRPC-Web unary", () => http1Call(proc.url, send, { ...auth, "content-type": "application/grpc-web+proto" }, envelope(bigBinary), "grpc-web")],
    ["gRPC envelope claiming 2 GiB", () => grpcCall(proc.url, send, { ...auth, "content-type": "application/grpc", te: "trailers" }, envelope(Buffer.alloc(10), 0, 0x7fffffff))],
    ["Connect JSON gzip bomb", () => http1Call(proc.url, send, { ...auth, "content-type": "application/json", "content-encoding": "gzip" }, bomb, "connect-unary")],
    ["gRPC gzip bomb", () => grpcCall(proc.url, send, { ...auth, "content-type": "application/grpc", te: "trailers", "grpc-encoding": "gzip" }, envelope(bombProto, 1))],
    // Without a token the answer may also be UNAUTHENTICATED, but never a 5xx or a hang.
    ["oversized without a token", () => http1Call(proc.url, send, { "content-type": "application/proto" }, bigBinary, "connect-unary"), (c) => exhausted(c) || c === "unauthenticated"],
  ];
  const results: string[] = [];
  for (const [name, call, allowed] of cases) {
    let answer: Answer | Error;
    try {
      answer = await call();
    } catch (error) {
      answer = error as Error;
    }
    results.push(`${name}: ${answer instanceof Error ? answer.message : answer.code}`);
    judge(name, answer, allowed ?? exhausted);
  }
  console.log(`  oversized: ${results.join("; ")}`);
  assert.ok(proc.running(), "the server survived");
  assert.equal(failures.splice(0), []);
});

it("fuzz - malformed, forged and expired JWTs get UNAUTHENTICATED on every protocol", async () => {
  const key = new TextEncoder().encode(TEST_SECRET);
  const sign = (claims: Record<string, unknown>, header: Record<string, unknown> = { alg: "HS256" }, secret = key) =>
    new SignJWT(claims).setProtectedHeader(header as { alg: string }).sign(secret);
  const now = Math.floor(Date.now() / 1000);
  const forged = [
    await sign({ sub: "alice", tid: tenant, exp: now + 60 }, { alg: "HS256" }, new TextEncoder().encode("x".repeat(40))),
    await sign({ sub: "alice", tid: tenant, exp: now - 10 }),
    await sign({ sub: "alice", tid: tenant, nbf: now + 3600, exp: now + 7200 }),
    await sign({ sub: "alice", tid: tenant, exp: "tomorrow" }),
    await sign({ sub: "alice", exp: now + 60 }),
    await sign({ sub: "alice", tid: 42, exp: now + 60 }),
    await sign({ sub: "alice", tid: ["t"], exp: now + 60 }),
    await sign({ sub: "alice", tid: "bad.tenant", exp: now + 60 }),
    await sign({ sub: "alice", tid: "-leading-dash", exp: now + 60 }),
    await sign({ sub: "alice", tid: "t".repeat(64), exp: now + 60 }),
    await sign({ sub: "alice", tid: "' OR 1=1 --", exp: now + 60 }),
    await sign({ tid: tenant, exp: now + 60 }),
    await sign({ sub: "", tid: tenant, exp: now + 60 }),
    await sign({ sub: 7, tid: tenant, exp: now + 60 }),
    await sign({ sub: "a".repeat(129), tid: tenant, exp: now + 60 }),
    await sign({ sub: "tab\there", tid: tenant, exp: now + 60 }),
    await sign({ sub: "nul\u0000", tid: tenant, exp: now + 60 }),
    await sign({ sub: "c1\u0085", tid: tenant, exp: now + 60 }),
    await sign({ sub: "alice", tid: tenant, exp: now + 60 }, { alg: "HS512" }),
    rawHs256({ alg: "HS256", crit: ["bogus"], bogus: 1 }, { sub: "alice", tid: tenant, exp: now + 60 }),
    rawHs256({ alg: "HS256", typ: "JWT" }, { sub: "alice", tid: tenant, exp: now + 60 }, "x".repeat(40)),
    rawHs256({ alg: "HS256" }, { sub: { $ne: "" }, tid: tenant, exp: now + 60 }),
    rawHs256({ alg: "HS256" }, { sub: "alice", tid: `${tenant}\u0000x`, exp: now + 60 }),
    await sign({ sub: "alice", tid: tenant, exp: now + 60, pad: "p".repeat(9000) }),
  ].map((t) => `Bearer ${t}`);
  // A valid token with a flipped signature bit and with its payload swapped in from another token.
  const good = await sign({ sub: "alice", tid: tenant, exp: now + 60 });
  const [h, p, s] = good.split(".") as [string, string, string];
  const other = (await sign({ sub: "mallory", tid: tenant, exp: now + 60 })).split(".")[1]!;
  // The first character of the signature: the last one partly encodes padding bits, and changing
  // those leaves the signature's bytes (and so the token) valid.
  const flipped = `${s.startsWith("A") ? "B" : "A"}${s.slice(1)}`;
  const tampered = [`Bearer ${h}.${p}.${flipped}`, `Bearer ${h}.${other}.${s}`, `Bearer ${h}.${p}`, `bearer  ${good}x`];
  const tokens = [...BAD_TOKENS, ...forged, ...tampered];
  const path = "/parley.v1.ChatService/ListChats";
  const sub = "/parley.v1.NotificationService/Subscribe";
  const empty = Buffer.alloc(0);
  const unauthenticated = (code: string) => code === "unauthenticated";
  for (const [i, authorization] of tokens.entries()) {
    const auth: Record<string, string> = authorization === "" ? {} : { authorization };
    const calls: [string, () => Promise<Answer>][] = [
      ["Connect JSON", () => http1Call(proc.url, path, { ...auth, "content-type": "application/json" }, Buffer.from("{}"), "connect-unary")],
      ["Connect binary", () => http1Call(proc.url, path, { ...auth, "content-type": "application/proto" }, empty, "connect-unary")],
      ["gRPC", () => grpcCall(proc.url, path, { ...auth, "content-type": "application/grpc", te: "trailers" }, envelope(empty))],
      ["gRPC stream", () => grpcCall(proc.url, sub, { ...auth, "content-type": "application/grpc", te: "trailers" }, envelope(empty))],
      ["gRPC-Web", () => http1Call(proc.url, path, { ...auth, "content-type": "application/grpc-web+proto" }, envelope(empty), "grpc-web")],
    ];
    for (const [name, call] of calls) {
      let answer: Answer | Error;
      try {
        answer = await call();
      } catch (error) {
        answer = error as Error;
      }
      judge(`token #${i} (${authorization.slice(0, 40)}…) over ${name}`, answer, unauthenticated);
    }
  }
  assert.equal(failures.splice(0), []);
});

it("fuzz - hostile user ids (. * > spaces, unicode, SQL) are stored verbatim, encoded safely on the bus and stay isolated", async () => {
  const hostile = [
    "a.b", "*", ">", "a b", " lead", "trail ", "ü", "😀🚀", "日本語", "a\u200bb", "' OR '1'='1", "\"; DROP TABLE members; --",
    "parley.x.chat.*", "user.*.>", "..", "%2e", "\\", "x".repeat(128), "é".repeat(128), "alice ", "ALICE",
  ];
  const owner = parleyClient(proc.url, await tokenFor(tenant, "owner"), "connect-http2");
  const { chat } = await owner.chats.createChat({ name: "'; DROP TABLE chats; --", memberIds: hostile });
  const clients = await Promise.all(hostile.map(async (id) => parleyClient(proc.url, await tokenFor(tenant, id), "connect-http2")));
  const streams = clients.map((c) => new StreamReader<Notification>(c.notifications.subscribe({ includeMessages: true })));
  for (const s of streams) assert.is((await s.next(10_000)).event.case, "ready");
  // A private chat of two ordinary users: none of the hostile ids may see anything of it.
  const { chat: secret } = await owner.chats.createChat({ name: "private", memberIds: ["normal"] });
  await owner.messages.sendMessage({ chatId: secret!.id, text: "not for wildcards" });
  const members: string[] = [];
  let pageToken = "";
  do {
    const page = await owner.members.listMembers({ chatId: chat!.id, pageSize: 200, pageToken });
    members.push(...page.members.map((m) => m.userId));
    pageToken = page.nextPageToken;
  } while (pageToken);
  assert.equal([...members].sort(), ["owner", ...hostile].sort(), "member ids are stored and returned verbatim");
  for (const [i, client] of clients.entries()) {
    const text = `${hostile[i]} says ${SQLISH[i % SQLISH.length]}`;
    const { message } = await client.messages.sendMessage({ chatId: chat!.id, text, clientMessageId: SQLISH[i % SQLISH.length] });
    assert.is(message!.senderId, hostile[i], "sender id verbatim");
    assert.is(message!.text, text, "text verbatim");
    const { chats } = await client.chats.listChats({});
    assert.equal(chats.map((c) => c.id), [chat!.id], `${JSON.stringify(hostile[i])} sees exactly its chat`);
  }
  for (const [i, stream] of streams.entries()) {
    const got: string[] = [];
    while (got.length < hostile.length) {
      const n = await stream.nextMatching((e) => e.event.case === "messageCreated", 10_000);
      if (n.event.case === "messageCreated") got.push(n.event.value.senderId);
    }
    assert.equal(got.sort(), [...hostile].sort(), `${JSON.stringify(hostile[i])} got every message of its chat once`);
    const leaked = (await stream.drain(100)).filter((n) => n.chatId === secret!.id);
    assert.equal(leaked, [], `${JSON.stringify(hostile[i])} got nothing of a chat it is not in`);
    stream.close();
  }
  // Ids a token may not carry, as member ids: INVALID_ARGUMENT naming the field.
  for (const bad of ["", "tab\there", "nul\u0000", "x".repeat(129), "c1\u009f"]) {
    try {
      await owner.members.addMembers({ chatId: chat!.id, userIds: [bad] });
      assert.unreachable(`AddMembers accepted ${JSON.stringify(bad)}`);
    } catch (error) {
      if (error instanceof assert.Assertion) throw error;
      assert.is(ConnectError.from(error).code, Code.InvalidArgument, `AddMembers ${JSON.stringify(bad)}`);
    }
  }
});

it("fuzz - truncated HTTP/2 frames, broken HTTP/1.1 requests and abruptly closed connections never take the server down", async () => {
  const rng = new Rng(SEED ^ 0x5eed);
  const PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
  const frame = (type: number, flags: number, stream: number, payload: Buffer, declared = payload.length) => {
    const head = Buffer.alloc(9);
    head.writeUIntBE(declared & 0xffffff, 0, 3);
    head[3] = type;
    head[4] = flags;
    head.writeUInt32BE(stream & 0x7fffffff, 5);
    return Buffer.concat([head, payload]);
  };
  const settings = frame(0x4, 0, 0, Buffer.alloc(0));
  const raw = (bytes: Buffer, holdMs = 50) => new Promise<void>((resolve) => {
    const socket = net.connect({ host: "127.0.0.1", port: proc.port }, () => {
      socket.write(bytes);
      setTimeout(() => {
        socket.destroy();
        resolve();
      }, holdMs);
    });
    socket.on("data", () => {});
    socket.on("error", () => resolve());
  });
  const payloads: Buffer[] = [
    PREFACE.subarray(0, 10),
    PREFACE,
    Buffer.concat([PREFACE, settings.subarray(0, 4)]),
    Buffer.concat([PREFACE, frame(0x4, 0, 0, Buffer.alloc(3), 6)]),
    Buffer.concat([PREFACE, settings, frame(0x1, 0x4, 1, rng.bytes(40))]),
    Buffer.concat([PREFACE, settings, frame(0x1, 0x4, 1, rng.bytes(10), 0xffffff)]),
    Buffer.concat([PREFACE, settings, frame(0x0, 0x1, 1, rng.bytes(30))]),
    Buffer.concat([PREFACE, settings, frame(0x3, 0, 1, Buffer.alloc(4)), frame(0x7, 0, 0, Buffer.alloc(8))]),
    Buffer.concat([PREFACE, settings, frame(0x8, 0, 0, Buffer.from([0x7f, 0xff, 0xff, 0xff]))]),
    Buffer.concat([PREFACE, settings, frame(0x1, 0x1, 3, Buffer.alloc(0)), frame(0x9, 0x4, 3, rng.bytes(16))]),
    Buffer.from("POST /parley.v1.ChatService/CreateChat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"na"),
    Buffer.from("POST /parley.v1.ChatService/CreateChat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\nzz\r\n"),
    Buffer.from("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + "a".repeat(300 * 1024) + "\r\n\r\n"),
    Buffer.from("GET /hubs/chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: x\r\n\r\n\x81\xff"),
    Buffer.from("GET /readyz HTTP/1.1\r\nHost"),
    Buffer.from("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), // a TLS ClientHello on the cleartext port
  ];
  for (let i = 0; i < 40; i++) payloads.push(rng.chance(0.5) ? Buffer.concat([PREFACE, settings, rng.bytes(rng.int(200))]) : rng.bytes(1 + rng.int(200)));
  for (let i = 0; i < payloads.length; i += 8) await Promise.all(payloads.slice(i, i + 8).map((p) => raw(p, 30 + rng.int(100))));

  // Real clients that give up halfway: half an envelope then the session dies; streams reset at once.
  for (let round = 0; round < 10; round++) {
    const socket = net.connect({ host: "127.0.0.1", port: proc.port });
    socket.on("error", () => {});
    const session = http2.connect(proc.url, { createConnection: () => socket });
    session.on("error", () => {});
    const headers = { ":method": "POST", "content-type": "application/grpc", te: "trailers", authorization: `Bearer ${aliceToken}` };
    const half = session.request({ ...headers, ":path": "/parley.v1.MessageService/SendMessage" });
    half.on("error", () => {});
    half.write(envelope(Buffer.alloc(100), 0).subarray(0, 40));
    const reset = session.request({ ...headers, ":path": "/parley.v1.ChatService/ListChats" });
    reset.on("error", () => {});
    reset.close(http2.constants.NGHTTP2_CANCEL);
    const streaming = session.request({ ...headers, ":path": "/parley.v1.NotificationService/Subscribe" });
    streaming.on("error", () => {});
    streaming.end(envelope(Buffer.alloc(0)));
    await sleep(rng.int(60));
    if (round % 2 === 0) session.destroy();
    else socket.destroy(); // the TCP connection vanishes under the session
  }
  for (let round = 0; round < 10; round++) {
    await new Promise<void>((resolve) => {
      const req = http.request(`${proc.url}/parley.v1.MessageService/SendMessage`, {
        method: "POST", agent: false,
        headers: { "content-type": "application/json", "content-length": "5000", authorization: `Bearer ${aliceToken}` },
      });
      req.on("error", () => resolve());
      req.write(`{"chatId":"${chatId}","text":"`);
      setTimeout(() => {
        req.destroy();
        resolve();
      }, 20 + rng.int(50));
    });
  }
  await sleep(300);
  assert.ok(proc.running(), `the server survived broken connections (exit ${proc.exitCode()})\n${proc.output().slice(-3000)}`);
  const health = await fetch(`${proc.url}/healthz`, { signal: AbortSignal.timeout(5000) });
  assert.is(health.status, 200);
  const { chats } = await parleyClient(proc.url, aliceToken, "grpc").chats.listChats({});
  assert.ok(chats.some((c) => c.id === chatId), "a normal gRPC call works");
});

it("fuzz - afterwards the server is healthy: alive, /healthz and /readyz, normal RPCs on every protocol, no internal errors logged", async () => {
  assert.ok(proc.running(), `the server is running (exit ${proc.exitCode()})`);
  for (const path of ["/healthz", "/readyz"]) {
    const res = await fetch(`${proc.url}${path}`, { signal: AbortSignal.timeout(5000) });
    assert.is(res.status, 200, path);
  }
  for (const protocol of protocols) {
    const client = parleyClient(proc.url, aliceToken, protocol);
    const { message } = await client.messages.sendMessage({ chatId, text: `still fine over ${protocol}` });
    const got = await client.messages.getMessage({ chatId, messageId: message!.id });
    assert.is(got.message!.text, `still fine over ${protocol}`);
  }
  const logs = proc.output().split("\n").filter((l) => /"level":(50|60)|internal error|uncaught|unhandled/i.test(l));
  assert.equal(logs.slice(0, 10), [], "no error-level log lines (internal errors, crashes)");
});

test.run();
