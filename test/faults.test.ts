// Fault injection: every protection is exercised by causing the fault for real — kill -9 of a server
// process, a private nats-server and a private PostgreSQL cluster stopped, frozen and restarted,
// clients that stop reading their streams, and instances restarted one after the other.
// The private services (test/support/processes.ts) use free ports and temp dirs and are killed by PID.
import http from "node:http";
import http2 from "node:http2";
import v8 from "node:v8";
import vm from "node:vm";
import postgres from "postgres";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { create, fromBinary, toBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { MessageSchema, Order, WatchMessagesRequestSchema, type Message } from "../gen/parley/v1/message_pb.js";
import { NotificationSchema, SubscribeRequestSchema, type Notification } from "../gen/parley/v1/notification_pb.js";
import { parleyClient, type ParleyClient, type Protocol } from "./support/clients.js";
import {
  exitSoonAfterSummary, freePort, readable, parleyEnv, sleep, startNats, startParleyProcess, startPostgres, tempDir,
  type NatsProcess, type ParleyProcess, type PostgresCluster,
} from "./support/processes.js";
import {
  createTestDatabase, describeBackends, startTestServer, testDatabaseUrl, testNatsUrl, tokenFor, uniqueTenant,
  type TestServer,
} from "./support/server.js";
import { RawHub } from "./support/hub.js";
import { StreamReader } from "./support/streams.js";

console.log(`faults suite — ${describeBackends()}`);

/** FAULTS_ONLY=<text> runs only the tests whose name contains it (for working on one scenario). */
const only = process.env.FAULTS_ONLY;
const it = (name: string, fn: () => Promise<void>) =>
  (only && !name.includes(only) ? test.skip : test)(name, async () => {
    const started = Date.now();
    try {
      await fn();
    } catch (error) {
      throw readable(error);
    } finally {
      console.log(`  [${((Date.now() - started) / 1000).toFixed(1)} s] ${name.slice(0, 60)}`);
    }
  });

test.after(() => exitSoonAfterSummary());

const NO_RATE_LIMIT = { PARLEY_SEND_RATE: "1000000", PARLEY_SEND_BURST: "1000000" };

// ---------------------------------------------------------------------------------------------
// Helpers

const codeOf = (error: unknown) => ConnectError.from(error).code;
const codeName = (code: Code | undefined) => (code === undefined ? "none" : Code[code]);
/** "OK" or the name of the call's error code. */
const outcome = (call: Promise<unknown>) => call.then(() => "OK", (error: unknown) => codeName(codeOf(error)));

async function until(what: string, check: () => boolean | Promise<boolean>, timeoutMs: number, everyMs = 50): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await sleep(everyMs);
  }
}

/** HTTP status of GET /readyz, or "no answer" when none came within timeoutMs. */
async function readyz(url: string, timeoutMs = 10_000): Promise<number | "no answer"> {
  try {
    const res = await fetch(`${url}/readyz`, { signal: AbortSignal.timeout(timeoutMs) });
    await res.arrayBuffer();
    return res.status;
  } catch {
    return "no answer";
  }
}

async function waitReadyz(url: string, status: number, timeoutMs: number): Promise<void> {
  let last: number | string = "none";
  await until(`/readyz ${status}`, async () => (last = await readyz(url, 3000)) === status, timeoutMs, 200).catch((error) => {
    throw new Error(`${(error as Error).message} (last answer: ${last})`);
  });
}

async function user(url: string, tenant: string, id: string, protocol: Protocol = "connect"): Promise<ParleyClient> {
  return parleyClient(url, await tokenFor(tenant, id), protocol);
}

/** Every stored message of a chat, oldest first, through all pages. */
async function listAll(client: ParleyClient, chatId: string, afterSequence = 0n): Promise<Message[]> {
  const all: Message[] = [];
  let pageToken = "";
  do {
    const page = await client.messages.listMessages(
      { chatId, afterSequence, order: Order.OLDEST_FIRST, pageSize: 200, pageToken },
      { timeoutMs: 15_000 },
    );
    all.push(...page.messages);
    pageToken = page.nextPageToken;
  } while (pageToken !== "");
  return all;
}

const range = (from: number, to: number) => Array.from({ length: Math.max(0, to - from + 1) }, (_, i) => BigInt(from + i));

/** Highest n such that 1..n are all in the set. */
function contiguous(sequences: Set<bigint>, from = 0n): bigint {
  let n = from;
  while (sequences.has(n + 1n)) n++;
  return n;
}

async function isEnded(reader: StreamReader<unknown>): Promise<boolean> {
  return reader.ended_(1).then(() => true, () => false);
}

/** A call that must fail: its code and how long it took. */
async function timed(what: string, call: () => Promise<unknown>): Promise<{ what: string; code: Code | "ok"; ms: number; message: string }> {
  const started = Date.now();
  try {
    await call();
    return { what, code: "ok", ms: Date.now() - started, message: "" };
  } catch (error) {
    const e = ConnectError.from(error);
    return { what, code: e.code, ms: Date.now() - started, message: e.rawMessage };
  }
}

/** The first item of a server stream, or its error. */
async function firstOf<T>(stream: AsyncIterable<T>): Promise<T> {
  for await (const item of stream) return item;
  throw new Error("stream ended without an item");
}

function gcFunction(): () => void {
  v8.setFlagsFromString("--expose-gc");
  return vm.runInNewContext("gc") as () => void;
}

function heapUsedAfterGc(gc: () => void): number {
  for (let i = 0; i < 3; i++) gc();
  return process.memoryUsage().heapUsed;
}

// ---------------------------------------------------------------------------------------------
// 1. Crash safety

it("crash - kill -9 while 20 clients send: every acknowledged message stored once, sequences 1..N, retries never duplicate", async () => {
  const data = await tempDir("parley-crash-");
  const database = testDatabaseUrl ? await createTestDatabase(testDatabaseUrl) : undefined;
  const env = parleyEnv({
    port: await freePort(), dataDir: data.dir, databaseUrl: database?.url, natsUrl: testNatsUrl, extra: NO_RATE_LIMIT,
  });
  let proc: ParleyProcess = await startParleyProcess(env);
  try {
    const tenant = uniqueTenant("crash");
    const users = Array.from({ length: 20 }, (_, i) => `user-${i}`);
    const protocols: Protocol[] = ["connect", "grpc", "connect-binary", "connect-http2", "connect-binary-http2"];
    const clients = await Promise.all(users.map((u, i) => user(proc.url, tenant, u, protocols[i % protocols.length])));
    const shared = (await clients[0]!.chats.createChat({ name: "everyone", memberIds: users })).chat!;
    const teams = await Promise.all([0, 1, 2, 3].map(async (k) =>
      (await clients[k * 5]!.chats.createChat({ name: `team ${k}`, memberIds: users.slice(k * 5, k * 5 + 5) })).chat!));
    const chatOf = (i: number, n: number) => (n % 2 === 0 ? shared.id : teams[Math.floor(i / 5)]!.id);

    interface Sent { user: number; chatId: string; cmid: string; text: string; id?: string; sequence?: bigint }
    const acked: Sent[] = [];
    const unresolved: Sent[] = [];
    const earlyErrors: string[] = [];
    let killed = false;
    const killer = (async () => {
      await until("150 acknowledged sends", () => acked.length >= 150, 60_000).catch(() => {});
      killed = true;
      proc.signal("SIGKILL");
    })();
    await Promise.all(clients.map(async (client, i) => {
      for (let n = 0; n < 100_000; n++) {
        const sent: Sent = { user: i, chatId: chatOf(i, n), cmid: `${users[i]}-${n}`, text: `${users[i]} says #${n}` };
        try {
          const { message } = await client.messages.sendMessage(
            { chatId: sent.chatId, text: sent.text, clientMessageId: sent.cmid },
            { timeoutMs: 15_000 },
          );
          acked.push({ ...sent, id: message!.id, sequence: message!.sequence });
        } catch (error) {
          // The outcome is unknown: the server may have stored it just before it died.
          unresolved.push(sent);
          if (!killed) earlyErrors.push(`${users[i]}: ${codeName(codeOf(error))} ${ConnectError.from(error).rawMessage}`);
          return;
        }
      }
    }));
    await killer;
    assert.ok(await proc.waitExit(10_000), "the killed process exited");
    assert.equal(earlyErrors, [], "no send failed before the crash");
    assert.ok(acked.length >= 150, `at least 150 sends acknowledged before the crash (got ${acked.length})`);

    proc = await startParleyProcess(env);
    const retry = async (client: ParleyClient, sent: Sent) => {
      const deadline = Date.now() + 30_000;
      for (;;) {
        try {
          return (await client.messages.sendMessage(
            { chatId: sent.chatId, text: sent.text, clientMessageId: sent.cmid },
            { timeoutMs: 10_000 },
          )).message!;
        } catch (error) {
          if (Date.now() > deadline || codeOf(error) !== Code.Unavailable) throw error;
          await sleep(200);
        }
      }
    };
    const fresh = await Promise.all(users.map((u, i) => user(proc.url, tenant, u, protocols[i % protocols.length])));
    // Every client retries what it does not know the outcome of, with the same client_message_id…
    const retried = await Promise.all(unresolved.map(async (sent) => ({ sent, message: await retry(fresh[sent.user]!, sent) })));
    // …and a few retries of sends that were acknowledged must return the original message.
    const replays = acked.filter((_, k) => k % 7 === 0);
    for (const sent of replays) {
      const again = await retry(fresh[sent.user]!, sent);
      assert.is(again.id, sent.id, `retry of acknowledged ${sent.cmid} returns the original message`);
      assert.is(again.sequence, sent.sequence, `retry of acknowledged ${sent.cmid} keeps its sequence`);
    }

    for (const chat of [shared, ...teams]) {
      const reader = fresh[chat.id === shared.id ? 0 : teams.indexOf(chat) * 5]!;
      const stored = await listAll(reader, chat.id);
      const expectedCmids = new Set([...acked, ...unresolved].filter((s) => s.chatId === chat.id).map((s) => s.cmid));
      assert.equal(stored.map((m) => m.sequence), range(1, stored.length), `${chat.name}: sequences 1..N without gaps`);
      const byCmid = new Map<string, Message[]>();
      for (const m of stored) byCmid.set(m.clientMessageId, [...(byCmid.get(m.clientMessageId) ?? []), m]);
      const duplicated = [...byCmid].filter(([, ms]) => ms.length > 1).map(([cmid]) => cmid);
      assert.equal(duplicated, [], `${chat.name}: no client_message_id stored twice`);
      const unknown = stored.filter((m) => !expectedCmids.has(m.clientMessageId)).map((m) => m.clientMessageId);
      assert.equal(unknown, [], `${chat.name}: nothing stored that no client sent`);
      assert.is(stored.length, expectedCmids.size, `${chat.name}: every send stored exactly once`);
      for (const sent of acked.filter((s) => s.chatId === chat.id)) {
        const [m] = byCmid.get(sent.cmid) ?? [];
        assert.ok(m, `acknowledged ${sent.cmid} is stored`);
        assert.equal([m!.id, m!.sequence, m!.text, m!.senderId], [sent.id, sent.sequence, sent.text, users[sent.user]], `acknowledged ${sent.cmid} unchanged`);
      }
      for (const { sent, message } of retried.filter((r) => r.sent.chatId === chat.id)) {
        assert.is(byCmid.get(sent.cmid)?.[0]?.id, message.id, `retried ${sent.cmid} stored once, as returned`);
      }
      const { chat: after } = await reader.chats.getChat({ chatId: chat.id });
      assert.is(after!.lastSequence, BigInt(stored.length), `${chat.name}: last_sequence matches the stored messages`);
    }
    const { message: next } = await fresh[0]!.messages.sendMessage({ chatId: shared.id, text: "after the crash" });
    const sharedCount = new Set([...acked, ...unresolved].filter((s) => s.chatId === shared.id).map((s) => s.cmid)).size;
    assert.is(next!.sequence, BigInt(sharedCount + 1), "numbering continues after the crash");
    console.log(`  crash: ${acked.length} acknowledged, ${unresolved.length} in flight at the kill ` +
      `(${retried.filter((r) => acked.every((a) => a.cmid !== r.sent.cmid)).length} retried)`);
  } finally {
    await proc.stop(5000).catch(() => {});
    await database?.drop().catch(() => {});
    await data.remove();
  }
});

// ---------------------------------------------------------------------------------------------
// 2. NATS outage

it("nats outage - sends succeed, /readyz 503, streams go on or end UNAVAILABLE, catch-up and resumed watch are complete", async () => {
  const nats: NatsProcess = await startNats();
  let server: TestServer | undefined;
  try {
    server = await startTestServer({ NATS_URL: nats.url, ...NO_RATE_LIMIT });
    const url = server.url;
    const tenant = uniqueTenant("nats");
    const alice = await user(url, tenant, "alice");
    const bob = await user(url, tenant, "bob", "connect-http2");
    const { chat } = await alice.chats.createChat({ name: "outage", memberIds: ["bob"] });
    const chatId = chat!.id;
    const sub = new StreamReader<Notification>(bob.notifications.subscribe({ includeMessages: true }));
    assert.is((await sub.next()).event.case, "ready");
    const watch = new StreamReader<Message>(bob.messages.watchMessages({ chatId }));
    const subSeen: bigint[] = [];
    const watchSeen: bigint[] = [];
    const collect = async () => {
      for (const n of await sub.drain(0)) {
        if (n.event.case === "messageCreated" && n.chatId === chatId) subSeen.push(n.event.value.sequence);
      }
      for (const m of await watch.drain(0)) watchSeen.push(m.sequence);
    };
    let sent = 0;
    const send = async (label: string) => {
      const started = Date.now();
      const { message } = await alice.messages.sendMessage({ chatId, text: `${label} ${sent + 1}`, clientMessageId: `m-${sent + 1}` }, { timeoutMs: 10_000 });
      sent++;
      assert.is(message!.sequence, BigInt(sent));
      return Date.now() - started;
    };
    for (let i = 0; i < 5; i++) await send("before");
    await until("5 messages live before the outage", async () => (await collect(), subSeen.length >= 5 && watchSeen.length >= 5), 10_000);
    const watchedBeforeOutage = BigInt(Math.max(...watchSeen.map(Number)));

    await nats.stop("SIGKILL");
    await waitReadyz(url, 503, 10_000);
    const outageTimes: number[] = [];
    for (let i = 0; i < 20; i++) outageTimes.push(await send("during"));
    assert.ok(Math.max(...outageTimes) < 3000, `sends during the outage are prompt (slowest ${Math.max(...outageTimes)} ms)`);
    assert.is(await readyz(url), 503, "/readyz still reports the bus down");

    await nats.start();
    await waitReadyz(url, 200, 20_000);
    for (let i = 0; i < 5; i++) await send("after");
    const total = BigInt(sent);

    // The streams opened before the outage: either they go on without losing anything, or they
    // ended with UNAVAILABLE so the client resubscribes.
    await until("old streams settle", async () => {
      await collect();
      const subDone = (await isEnded(sub)) || subSeen.includes(total);
      const watchDone = (await isEnded(watch)) || watchSeen.includes(total);
      return subDone && watchDone;
    }, 20_000).catch(() => {});
    await collect();
    const problems: string[] = [];
    if (await isEnded(sub)) {
      if (codeOf(sub.error) !== Code.Unavailable) problems.push(`Subscribe ended with ${codeName(codeOf(sub.error))}, not UNAVAILABLE`);
    } else {
      const got = [...subSeen].sort((x, y) => Number(x - y));
      const missing = range(1, sent).filter((s) => !got.includes(s));
      if (missing.length > 0 || got.length !== sent) {
        problems.push(`Subscribe went on without ending but missed sequences ${missing.join(",") || "none"} (got ${got.length} events for ${sent} messages)`);
      }
    }
    if (await isEnded(watch)) {
      if (codeOf(watch.error) !== Code.Unavailable) problems.push(`WatchMessages ended with ${codeName(codeOf(watch.error))}, not UNAVAILABLE`);
    } else if (watchSeen.join() !== range(1, sent).join()) {
      problems.push(`WatchMessages went on but delivered ${watchSeen.join(",")}`);
    }
    sub.close();
    watch.close();

    // The catch-up procedure: resubscribe, wait for Ready, ListChats, ListMessages(after what we had).
    const have = new Set<bigint>(subSeen.filter((s) => s <= 5n));
    const again = new StreamReader<Notification>(bob.notifications.subscribe({ includeMessages: true }));
    assert.is((await again.next(10_000)).event.case, "ready");
    const { chats } = await bob.chats.listChats({});
    const listed = chats.find((c) => c.id === chatId);
    assert.is(listed?.lastSequence, total, "ListChats shows the chat's last sequence");
    const had = contiguous(have);
    for (const m of await listAll(bob, chatId, had)) have.add(m.sequence);
    assert.equal([...have].sort((a, b) => Number(a - b)), range(1, sent), "catch-up after the outage has every message");
    await send("live again");
    const live = await again.nextMatching((n) => n.event.case === "messageCreated", 10_000);
    assert.is(live.event.case === "messageCreated" && live.event.value.sequence, BigInt(sent), "the new stream is live");
    again.close();

    // WatchMessages resumed from what the old watch had before the outage.
    const resumed = new StreamReader<Message>(bob.messages.watchMessages({ chatId, afterSequence: watchedBeforeOutage }));
    const got: bigint[] = [];
    while (got.length < sent - Number(watchedBeforeOutage)) got.push((await resumed.next(10_000)).sequence);
    await send("while resumed");
    got.push((await resumed.next(10_000)).sequence);
    assert.equal(got, range(Number(watchedBeforeOutage) + 1, sent), "the resumed watch has every message exactly once, in order");
    assert.equal(await resumed.drain(300), [], "and nothing twice");
    resumed.close();
    // Checked last, so that everything above is known too when this fails.
    assert.equal(problems, [], "streams open during the outage either lose nothing or end with UNAVAILABLE (so the client resubscribes)");
  } finally {
    // Shut the server down with its bus reachable, as in production.
    if (!nats.running()) await nats.start().catch(() => {});
    await server?.destroy().catch(() => {});
    await nats.destroy();
  }
});

// ---------------------------------------------------------------------------------------------
// 3. PostgreSQL outage

const DB_TIMEOUT_SECONDS = 2;
/** What "fails fast" may take beyond PARLEY_DB_TIMEOUT_SECONDS on a loaded 2-core machine. */
const SLACK_MS = 3000;

/** Every kind of RPC while the database is unreachable, all at once; each must fail with UNAVAILABLE in time. */
async function rpcsDuringDbOutage(client: ParleyClient, chatId: string, messageId: string) {
  const opts = { timeoutMs: 8000 };
  return Promise.all([
    timed("CreateChat", () => client.chats.createChat({ name: "x", memberIds: ["bob"] }, opts)),
    timed("GetChat", () => client.chats.getChat({ chatId }, opts)),
    timed("ListChats", () => client.chats.listChats({}, opts)),
    timed("MarkRead", () => client.chats.markRead({ chatId, sequence: 1n }, opts)),
    timed("SendMessage", () => client.messages.sendMessage({ chatId, text: "lost?", clientMessageId: "during-outage" }, opts)),
    timed("ListMessages", () => client.messages.listMessages({ chatId }, opts)),
    timed("GetMessage", () => client.messages.getMessage({ chatId, messageId }, opts)),
    timed("ListMembers", () => client.members.listMembers({ chatId }, opts)),
    timed("AddMembers", () => client.members.addMembers({ chatId, userIds: ["carol"] }, opts)),
    timed("RemoveMember", () => client.members.removeMember({ chatId, userId: "bob" }, opts)),
    timed("Subscribe", () => firstOf(client.notifications.subscribe({}, opts))),
    timed("WatchMessages", () => firstOf(client.messages.watchMessages({ chatId }, opts))),
  ]);
}

function slowOrWrong(results: Awaited<ReturnType<typeof rpcsDuringDbOutage>>, label: string): string[] {
  const limit = DB_TIMEOUT_SECONDS * 1000 + SLACK_MS;
  return results
    .filter((r) => r.code !== Code.Unavailable || r.ms > limit)
    .map((r) => `${label} ${r.what}: ${r.code === "ok" ? "OK" : codeName(r.code)} after ${r.ms} ms ${r.message}`);
}

async function dbScenario(outage: (pg: PostgresCluster) => Promise<void>, recover: (pg: PostgresCluster) => Promise<void>, label: string) {
  const pg = await startPostgres();
  let server: TestServer | undefined;
  try {
    server = await startTestServer({ DATABASE_URL: pg.url, PARLEY_DB_TIMEOUT_SECONDS: String(DB_TIMEOUT_SECONDS), ...NO_RATE_LIMIT });
    const url = server.url;
    const tenant = uniqueTenant("pg");
    const alice = await user(url, tenant, "alice", "grpc");
    const { chat } = await alice.chats.createChat({ name: "db", memberIds: ["bob"] });
    const chatId = chat!.id;
    let last: Message | undefined;
    for (let i = 1; i <= 3; i++) last = (await alice.messages.sendMessage({ chatId, text: `m${i}` })).message;
    await waitReadyz(url, 200, 5000);
    // Several pooled connections are open (and idle) when the fault hits, as in a busy server.
    await Promise.all(Array.from({ length: 12 }, () => alice.chats.listChats({})));

    await outage(pg);
    const limit = DB_TIMEOUT_SECONDS * 1000 + SLACK_MS;
    const problems: string[] = [];
    const started = Date.now();
    const status = await readyz(url, 8000);
    const readyMs = Date.now() - started;
    if (status !== 503 || readyMs > limit) problems.push(`/readyz: ${status} after ${readyMs} ms`);
    problems.push(...slowOrWrong(await rpcsDuringDbOutage(alice, chatId, last!.id), "first calls:"));
    problems.push(...slowOrWrong(await rpcsDuringDbOutage(alice, chatId, last!.id), "later calls:"));
    assert.equal(problems, [], `${label}: /readyz answers 503 and every RPC fails with UNAVAILABLE, each within ${limit} ms`);

    await recover(pg);
    // The same server, not restarted, recovers by itself.
    let sentAfter: Message | undefined;
    let lastError = "";
    await until(`${label}: SendMessage works again`, async () => {
      try {
        sentAfter = (await alice.messages.sendMessage({ chatId, text: "back", clientMessageId: "during-outage" }, { timeoutMs: 5000 })).message;
        return true;
      } catch (error) {
        lastError = `${codeName(codeOf(error))} ${ConnectError.from(error).rawMessage}`;
        return false;
      }
    }, 20_000, 250).catch((error) => {
      throw new Error(`${(error as Error).message}; last error: ${lastError}`);
    });
    await waitReadyz(url, 200, 15_000);
    assert.is(sentAfter!.sequence, 4n, `${label}: failed sends consumed no sequence number`);
    const stored = await listAll(alice, chatId);
    assert.equal(stored.map((m) => m.sequence), range(1, 4), `${label}: 1..4 without gaps or duplicates`);
    const stream = new StreamReader<Notification>(alice.notifications.subscribe({}));
    assert.is((await stream.next(10_000)).event.case, "ready", `${label}: streams work again`);
    stream.close();
  } finally {
    pg.thaw();
    await server?.destroy().catch(() => {});
    await pg.destroy();
  }
}

it("postgres outage - database stopped: RPCs fail fast with UNAVAILABLE, /readyz 503, the server recovers by itself", async () => {
  await dbScenario((pg) => pg.stop(), (pg) => pg.start(), "stopped database");
});

it("postgres outage - database frozen (SIGSTOP, connections open but silent): no RPC or /readyz hangs past PARLEY_DB_TIMEOUT_SECONDS", async () => {
  await dbScenario(async (pg) => pg.freeze(), async (pg) => pg.thaw(), "frozen database");
});

/** Runs statements on the cluster's template1, which stays open to connections whatever happens to the database Parley uses. */
async function onTemplate1(pg: PostgresCluster, run: (sql: postgres.Sql) => Promise<unknown>): Promise<void> {
  const sql = postgres(pg.url.replace(/\/postgres$/, "/template1"), { max: 1, onnotice: () => {} });
  try {
    await run(sql);
  } finally {
    await sql.end({ timeout: 2 });
  }
}

it("postgres outage - database refusing connections (FATAL at connect): RPCs fail fast with UNAVAILABLE, never INTERNAL", async () => {
  await dbScenario(
    (pg) => onTemplate1(pg, async (sql) => {
      await sql`ALTER DATABASE postgres ALLOW_CONNECTIONS false`;
      await sql`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'postgres'`;
    }),
    (pg) => onTemplate1(pg, (sql) => sql`ALTER DATABASE postgres ALLOW_CONNECTIONS true`),
    "database refusing connections",
  );
});

// ---------------------------------------------------------------------------------------------
// 4. Slow consumers

/** One message in the 5-byte length-prefixed envelope of gRPC and Connect streaming. */
function envelope(message: Uint8Array): Buffer {
  const frame = Buffer.alloc(5 + message.length);
  frame.writeUInt32BE(message.length, 1);
  frame.set(message, 5);
  return frame;
}

/** A gRPC server stream over a raw HTTP/2 session, so the test decides when (and whether) to read. */
class RawGrpcStream<S extends DescMessage> {
  readonly session: http2.ClientHttp2Session;
  readonly stream: http2.ClientHttp2Stream;
  readonly items: MessageShape<S>[] = [];
  grpcStatus: string | undefined;
  grpcMessage: string | undefined;
  rstCode: number | undefined;
  closed = false;
  private buffer = Buffer.alloc(0);

  constructor(url: string, path: string, token: string, request: Uint8Array, private readonly schema: S, windowSize = 16 * 1024) {
    this.session = http2.connect(url, { settings: { initialWindowSize: windowSize } });
    this.session.on("error", () => {});
    this.stream = this.session.request({
      ":method": "POST", ":path": path, "content-type": "application/grpc", te: "trailers", authorization: `Bearer ${token}`,
    });
    this.stream.end(envelope(request));
    this.stream.on("error", () => {});
    this.stream.on("response", (headers) => this.onHeaders(headers));
    this.stream.on("trailers", (trailers) => this.onHeaders(trailers));
    this.stream.on("data", (chunk: Buffer) => this.onData(chunk));
    this.stream.on("close", () => {
      this.closed = true;
      this.rstCode = this.stream.rstCode;
    });
  }

  private onHeaders(headers: http2.IncomingHttpHeaders) {
    if (headers["grpc-status"] !== undefined) {
      this.grpcStatus = String(headers["grpc-status"]);
      this.grpcMessage = decodeURIComponent(String(headers["grpc-message"] ?? ""));
    }
  }

  private onData(chunk: Buffer) {
    this.buffer = Buffer.concat([this.buffer, chunk]);
    while (this.buffer.length >= 5) {
      const length = this.buffer.readUInt32BE(1);
      if (this.buffer.length < 5 + length) break;
      this.items.push(fromBinary(this.schema, this.buffer.subarray(5, 5 + length)));
      this.buffer = this.buffer.subarray(5 + length);
    }
  }

  pause() {
    this.stream.pause();
  }

  resume() {
    this.stream.resume();
  }

  close() {
    if (!this.stream.closed) this.stream.close(http2.constants.NGHTTP2_CANCEL);
    this.session.destroy();
  }
}

/** Open Subscribe streams on a server, from its parley_active_streams gauge. */
async function openSubscribeStreams(server: TestServer): Promise<number> {
  const { values } = await server.server.metrics.activeStreams.get();
  return values.find((v) => v.labels.kind === "subscribe")?.value ?? 0;
}

it("slow consumers - a Subscribe client that never reads: bounded server memory, others on time, then reset with RESOURCE_EXHAUSTED", async () => {
  const gc = gcFunction();
  const server = await startTestServer({ ...NO_RATE_LIMIT, PARLEY_HEARTBEAT_SECONDS: "3600" });
  let stuck: RawGrpcStream<typeof NotificationSchema> | undefined;
  try {
    const tenant = uniqueTenant("slow");
    const senders = await Promise.all(["alice", "carol", "dave", "erin"].map((u) => user(server.url, tenant, u, "connect-http2")));
    const bob = await user(server.url, tenant, "bob", "connect-http2");
    const { chat } = await senders[0]!.chats.createChat({ name: "firehose", memberIds: ["bob", "carol", "dave", "erin", "mallory"] });
    const chatId = chat!.id;

    stuck = new RawGrpcStream(server.url, "/parley.v1.NotificationService/Subscribe", await tokenFor(tenant, "mallory"),
      toBinary(SubscribeRequestSchema, create(SubscribeRequestSchema, { includeMessages: true })), NotificationSchema, 8 * 1024);
    await until("the stuck subscriber's Ready", () => stuck!.items.length > 0, 10_000);
    stuck.pause();
    const normal = new StreamReader<Notification>(bob.notifications.subscribe({ includeMessages: true }));
    assert.is((await normal.next()).event.case, "ready");

    const heapBefore = heapUsedAfterGc(gc);
    // 3,000 events of ~8 KiB of string each: far beyond the 1,000-event queue.
    const total = 3000;
    const text = "ж".repeat(4096);
    const sentAt = new Map<bigint, number>();
    const lags: number[] = [];
    let received = 0;
    const reading = (async () => {
      while (received < total) {
        const n = await normal.next(30_000);
        if (n.event.case !== "messageCreated") continue;
        received++;
        const at = sentAt.get(n.event.value.sequence);
        lags.push(at === undefined ? 0 : Date.now() - at);
      }
    })();
    let next = 0;
    await Promise.all(senders.map(async (client) => {
      while (next < total) {
        next++;
        const { message } = await client.messages.sendMessage({ chatId, text }, { timeoutMs: 30_000 });
        sentAt.set(message!.sequence, Date.now());
      }
    }));
    await reading;
    const heapAfter = heapUsedAfterGc(gc);
    lags.sort((a, b) => a - b);
    const p99 = lags[Math.floor(lags.length * 0.99)]!;
    const max = lags.at(-1)!;
    const growthMb = (heapAfter - heapBefore) / 2 ** 20;
    console.log(`  slow subscribe: normal subscriber lag p99 ${p99} ms, max ${max} ms; heap growth ${growthMb.toFixed(1)} MiB`);
    assert.is(received, total, "the normal subscriber got every event");
    assert.is(normal.error, undefined, "the normal subscriber's stream is intact");
    assert.ok(max < 5000, `the normal subscriber is not held up by the stuck one (max lag ${max} ms)`);
    // An unbounded queue would keep all 3,000 events (> 24 MiB of text) for the stuck stream.
    assert.ok(growthMb < 12, `server memory stays bounded while a stream is stuck (heap grew ${growthMb.toFixed(1)} MiB)`);

    // The stuck client still reads nothing, so no in-band error can reach it: the server resets the
    // stream with ENHANCE_YOUR_CALM (gRPC clients report RESOURCE_EXHAUSTED) and frees its slot.
    await until("the stuck stream is reset while its client does not read", () => stuck!.closed, 10_000);
    assert.is(stuck.rstCode, http2.constants.NGHTTP2_ENHANCE_YOUR_CALM, `reset code ${stuck.rstCode}`);
    await until("the server released the stuck stream", async () => (await openSubscribeStreams(server)) === 1, 5000);
    const delivered = stuck.items.filter((n) => n.event.case === "messageCreated").length;
    assert.ok(delivered < total, `the stuck stream did not get all ${total} events queued up (got ${delivered})`);
    normal.close();
  } finally {
    stuck?.close();
    await server.destroy();
  }
});

it("slow consumers - a hub client that never reads: the server drops its socket and frees its stream", async () => {
  const server = await startTestServer({ ...NO_RATE_LIMIT, PARLEY_STREAM_QUEUE_LIMIT: "50", PARLEY_HUB_KEEPALIVE_SECONDS: "3600" });
  let stuck: RawHub | undefined;
  try {
    const tenant = uniqueTenant("slowhub");
    const alice = await user(server.url, tenant, "alice", "connect-http2");
    const { chat } = await alice.chats.createChat({ name: "firehose", memberIds: ["mallory"] });
    stuck = await RawHub.connect(server.url, await tokenFor(tenant, "mallory"));
    assert.is((await stuck.next()).target, "Ready");
    stuck.ws.pause();
    const hubStreams = async () =>
      (await server.server.metrics.activeStreams.get()).values.find((v) => v.labels.kind === "hub")?.value ?? 0;
    assert.is(await hubStreams(), 1);
    // ~8 KiB per event: the socket's buffers fill, then the 50-event queue overflows.
    const text = "ж".repeat(4096);
    let sent = 0;
    while ((await hubStreams()) > 0) {
      if (sent >= 5000) assert.unreachable(`the stuck hub connection is still open after ${sent} events`);
      await alice.messages.sendMessage({ chatId: chat!.id, text });
      sent++;
    }
    console.log(`  stuck hub client cut off after ${sent} events`);
    assert.is(await openSubscribeStreams(server), 0, "its notification stream ended too");
    stuck.ws.resume();
    await stuck.closed;
    assert.is(stuck.closeCode, 1006, "the socket was dropped, not closed with a handshake the client could not read");
  } finally {
    stuck?.ws.terminate();
    await server.destroy();
  }
});

it("slow consumers - a hub client that pauses gets every event in order once it reads again, also events sent meanwhile", async () => {
  // A queue that never overflows: what the socket's buffers cannot take waits in the server's queue.
  const server = await startTestServer({ ...NO_RATE_LIMIT, PARLEY_STREAM_QUEUE_LIMIT: "2000", PARLEY_HUB_KEEPALIVE_SECONDS: "3600" });
  let paused: RawHub | undefined;
  try {
    const { tenant, send } = await firehose(server, "pausinghub");
    paused = await RawHub.connect(server.url, await tokenFor(tenant, "mallory"));
    assert.is((await paused.next()).target, "Ready");
    paused.ws.pause();
    // ~8 KiB each: far more than the kernel's socket buffers and the hub's 256 KiB write buffer hold.
    const whilePaused = 600;
    for (let n = 1; n <= whilePaused; n++) await send(n);
    paused.ws.resume();
    for (let n = whilePaused + 1; n <= whilePaused + 50; n++) await send(n);
    const sequences: number[] = [];
    while (sequences.length < whilePaused + 50) {
      const record = await paused.next({ timeoutMs: 10_000 });
      if (record.target === "MessageCreated") sequences.push(Number(record.arguments[0].sequence));
    }
    assert.equal(sequences, Array.from({ length: whilePaused + 50 }, (_, i) => i + 1));
    assert.is(paused.closeCode, undefined, "the connection stayed open");
  } finally {
    paused?.close();
    await server.destroy();
  }
});

it("slow consumers - a WatchMessages client that stops reading resyncs from storage: every message exactly once, in order", async () => {
  const server = await startTestServer(NO_RATE_LIMIT);
  let stuck: RawGrpcStream<typeof MessageSchema> | undefined;
  try {
    const tenant = uniqueTenant("slowwatch");
    const senders = await Promise.all(["alice", "carol", "dave"].map((u) => user(server.url, tenant, u, "connect-http2")));
    const { chat } = await senders[0]!.chats.createChat({ name: "firehose", memberIds: ["carol", "dave", "mallory"] });
    const chatId = chat!.id;
    await senders[0]!.messages.sendMessage({ chatId, text: "first" });
    stuck = new RawGrpcStream(server.url, "/parley.v1.MessageService/WatchMessages", await tokenFor(tenant, "mallory"),
      toBinary(WatchMessagesRequestSchema, create(WatchMessagesRequestSchema, { chatId })), MessageSchema, 4 * 1024);
    await until("the first message on the watch", () => stuck!.items.length > 0, 10_000);
    stuck.pause();
    const total = 2000;
    const text = "x".repeat(500);
    let next = 1;
    await Promise.all(senders.map(async (client) => {
      while (next < total) {
        next++;
        await client.messages.sendMessage({ chatId, text }, { timeoutMs: 30_000 });
      }
    }));
    stuck.resume();
    // Promptly: from storage right after the overflow, not only at the 15 s idle resync.
    const resumedAt = Date.now();
    await until(`the resumed watch reaches ${total} promptly`, () => stuck!.items.length >= total || stuck!.closed, 8000).catch((error) => {
      throw new Error(`${(error as Error).message}: ${stuck!.items.length} messages after ${Date.now() - resumedAt} ms`);
    });
    await sleep(300);
    assert.is(stuck.grpcStatus, undefined, `the watch stream stays open (ended with ${stuck.grpcStatus} ${stuck.grpcMessage ?? ""})`);
    assert.equal(stuck.items.map((m) => m.sequence), range(1, total), "every message exactly once, in order, after falling behind");
    await senders[1]!.messages.sendMessage({ chatId, text: "live" });
    await until("a live message after the resync", () => stuck!.items.length > total, 10_000);
    assert.is(stuck.items.at(-1)!.sequence, BigInt(total + 1));
  } finally {
    stuck?.close();
    await server.destroy();
  }
});

/** Alice's chat with mallory, and a way to send event n into it (~8 KiB of text each). */
async function firehose(server: TestServer, label: string): Promise<{ tenant: string; send: (n: number) => Promise<unknown> }> {
  const tenant = uniqueTenant(label);
  const alice = await user(server.url, tenant, "alice", "connect-http2");
  const { chat } = await alice.chats.createChat({ name: "firehose", memberIds: ["mallory"] });
  const text = "ж".repeat(4000);
  return { tenant, send: (n) => alice.messages.sendMessage({ chatId: chat!.id, text: `${n} ${text}` }) };
}

/**
 * Mallory's Subscribe over a raw HTTP/2 session with an 8 KiB window, paused after Ready, then
 * `events` events of ~8 KiB sent by alice into their chat: a few fill the window and the stream's
 * write buffer, the rest wait in the server's queue.
 */
async function floodPausedSubscriber(server: TestServer, label: string, events = 100) {
  const { tenant, send } = await firehose(server, label);
  const stream = new RawGrpcStream(server.url, "/parley.v1.NotificationService/Subscribe", await tokenFor(tenant, "mallory"),
    toBinary(SubscribeRequestSchema, create(SubscribeRequestSchema, { includeMessages: true })), NotificationSchema, 8 * 1024);
  try {
    await until("the subscriber's Ready", () => stream.items.length > 0, 10_000);
    stream.pause();
    for (let n = 1; n <= events; n++) await send(n);
  } catch (error) {
    stream.close();
    throw error;
  }
  return { stream, send };
}

it("slow consumers - a Subscribe client that falls behind but reads again within the grace gets RESOURCE_EXHAUSTED in-band", async () => {
  const server = await startTestServer({ ...NO_RATE_LIMIT, PARLEY_HEARTBEAT_SECONDS: "3600", PARLEY_STREAM_QUEUE_LIMIT: "50" });
  let behind: RawGrpcStream<typeof NotificationSchema> | undefined;
  try {
    // Sending the 100 events takes far less than the 2 s after which a client that still reads
    // nothing is cut off; the 50-event queue overflows on the way.
    ({ stream: behind } = await floodPausedSubscriber(server, "behind"));
    behind.resume();
    await until("the stream ends", () => behind!.closed, 10_000);
    assert.is(behind.rstCode ?? 0, 0, "ended in-band, not reset");
    assert.is(behind.grpcStatus, "8", `grpc-status ${behind.grpcStatus} (${behind.grpcMessage})`);
    assert.match(behind.grpcMessage ?? "", /fell more than 50 events behind/);
    const delivered = behind.items.filter((n) => n.event.case === "messageCreated").length;
    assert.ok(delivered < 100, `it did not get all 100 events (got ${delivered})`);
  } finally {
    behind?.close();
    await server.destroy();
  }
});

it("slow consumers - a Subscribe client far behind a small queue holds no slot while it reads nothing, and learns RESOURCE_EXHAUSTED when it reads", async () => {
  // A small queue and small messages: the queue overflows while the client's 64 KiB window still takes
  // writes, so the stream can end with its error written into a transport the client does not read.
  const server = await startTestServer({ ...NO_RATE_LIMIT, PARLEY_HEARTBEAT_SECONDS: "3600", PARLEY_STREAM_QUEUE_LIMIT: "5" });
  const tenant = uniqueTenant("inband");
  const alice = await user(server.url, tenant, "alice", "connect-http2");
  const { chat } = await alice.chats.createChat({ name: "small messages", memberIds: ["mallory"] });
  const stuck = new RawGrpcStream(server.url, "/parley.v1.NotificationService/Subscribe", await tokenFor(tenant, "mallory"),
    toBinary(SubscribeRequestSchema, create(SubscribeRequestSchema, { includeMessages: true })), NotificationSchema, 65_535);
  try {
    await until("the subscriber's Ready", () => stuck.items.length > 0, 10_000);
    stuck.pause();
    let sent = 0;
    await Promise.all(Array.from({ length: 16 }, async () => {
      while (sent < 1000) await alice.messages.sendMessage({ chatId: chat!.id, text: `${++sent} ${"p".repeat(2000)}` });
    }));
    await until("the stream's slot is free while its client reads nothing", async () => (await openSubscribeStreams(server)) === 0, 8000);
    stuck.resume();
    await until("the stream ends once read", () => stuck.closed, 8000);
    const outcome = stuck.rstCode === http2.constants.NGHTTP2_ENHANCE_YOUR_CALM ? "reset" : `grpc-status ${stuck.grpcStatus}`;
    assert.ok(outcome === "reset" || stuck.grpcStatus === "8", `RESOURCE_EXHAUSTED, by reset or in-band: got ${outcome} (rst ${stuck.rstCode})`);
  } finally {
    stuck.close();
    await server.destroy();
  }
});

it("slow consumers - a Subscribe client that pauses within its queue limit gets every event in order once it reads again, also events sent meanwhile", async () => {
  const server = await startTestServer({ ...NO_RATE_LIMIT, PARLEY_HEARTBEAT_SECONDS: "3600" });
  let paused: RawGrpcStream<typeof NotificationSchema> | undefined;
  try {
    const flooded = await floodPausedSubscriber(server, "pausing", 60);
    paused = flooded.stream;
    // Reading again while more arrive: the queued events must still come out before the new ones.
    paused.resume();
    for (let n = 61; n <= 120; n++) await flooded.send(n);
    const messages = () => paused!.items.filter((e) => e.event.case === "messageCreated");
    await until("all 120 events", () => messages().length >= 120 || paused!.closed, 20_000);
    assert.not.ok(paused.closed, `the stream stayed open (grpc-status ${paused.grpcStatus} ${paused.grpcMessage ?? ""})`);
    const sequences = messages().map((e) => (e.event.case === "messageCreated" ? Number(e.event.value.sequence) : 0));
    assert.equal(sequences, Array.from({ length: 120 }, (_, i) => i + 1));
  } finally {
    paused?.close();
    await server.destroy();
  }
});

it("slow consumers - a Subscribe client that stopped reading does not hold up shutdown: reset with REFUSED_STREAM (UNAVAILABLE)", async () => {
  // A long shutdown timeout, so that waiting for it would show; a queue that never overflows, so
  // that nothing but the shutdown ends the stuck stream.
  const server = await startTestServer({
    ...NO_RATE_LIMIT, PARLEY_HEARTBEAT_SECONDS: "3600", PARLEY_STREAM_QUEUE_LIMIT: "100000", PARLEY_SHUTDOWN_TIMEOUT_SECONDS: "60",
  });
  let stuck: RawGrpcStream<typeof NotificationSchema> | undefined;
  try {
    ({ stream: stuck } = await floodPausedSubscriber(server, "stuckstop"));
    const started = Date.now();
    await server.stop();
    const tookMs = Date.now() - started;
    console.log(`  shutdown with a stuck stream took ${tookMs} ms`);
    assert.ok(tookMs < 10_000, `shutdown did not wait for the 60 s timeout (took ${tookMs} ms)`);
    await until("the stuck stream is reset while its client does not read", () => stuck!.closed, 5000);
    assert.is(stuck.rstCode, http2.constants.NGHTTP2_REFUSED_STREAM, `reset code ${stuck.rstCode} (gRPC clients report REFUSED_STREAM as UNAVAILABLE)`);
  } finally {
    stuck?.close();
    await server.destroy(); // after stop(): close() is idempotent, this deletes the data
  }
});

it("slow consumers - an HTTP/1.1 Subscribe client that stopped reading does not hold up shutdown: its connection is closed", async () => {
  const server = await startTestServer({
    ...NO_RATE_LIMIT, PARLEY_HEARTBEAT_SECONDS: "3600", PARLEY_STREAM_QUEUE_LIMIT: "100000", PARLEY_SHUTDOWN_TIMEOUT_SECONDS: "60",
  });
  let socketClosed = false;
  let response: http.IncomingMessage | undefined;
  try {
    const { tenant, send } = await firehose(server, "stuckh1");
    // Connect's streaming protocol over HTTP/1.1, one connection of its own.
    const request = toBinary(SubscribeRequestSchema, create(SubscribeRequestSchema, { includeMessages: true }));
    const req = http.request(`${server.url}/parley.v1.NotificationService/Subscribe`, {
      method: "POST", agent: false,
      headers: { "content-type": "application/connect+proto", "connect-protocol-version": "1", authorization: `Bearer ${await tokenFor(tenant, "mallory")}` },
    });
    req.end(envelope(request));
    response = await new Promise<http.IncomingMessage>((resolve, reject) => req.once("response", resolve).once("error", reject));
    assert.is(response.statusCode, 200);
    response.socket.once("close", () => (socketClosed = true));
    let received = 0;
    response.on("data", (chunk: Buffer) => (received += chunk.length));
    await until("Ready", () => received > 0, 10_000);
    // Stop reading; 6.4 MB of events: more than the socket buffers of both ends take (the server's send
    // buffer grows to 4 MiB at most, the reader's window does not grow while it reads nothing).
    response.pause();
    for (let n = 1; n <= 800; n++) await send(n);
    const started = Date.now();
    await server.stop();
    const tookMs = Date.now() - started;
    console.log(`  shutdown with a stuck HTTP/1.1 stream took ${tookMs} ms`);
    assert.ok(tookMs < 10_000, `shutdown did not wait for the 60 s timeout (took ${tookMs} ms)`);
    // The server has let go of the connection; the client learns it once it reads what was sent before.
    response.resume();
    await until("the stuck stream's connection is closed", () => socketClosed, 10_000);
  } finally {
    response?.destroy();
    await server.destroy();
  }
});

// ---------------------------------------------------------------------------------------------
// Deadlines: a query blocked behind the test's own lock must be cancelled in PostgreSQL when the
// client's deadline passes (PGlite has a single connection, so nothing can hold a lock against it).

const withRealDatabase = testDatabaseUrl ? it : test.skip;
if (!testDatabaseUrl) console.log("!!! SKIPPED deadline-cancellation test: set TEST_DATABASE_URL (.ci/run does) !!!");

withRealDatabase("deadline - a client deadline cancels the server's SQL: the blocked send is never stored, no query keeps waiting", async () => {
  // Far beyond the deadlines below: only the client's deadline can end the blocked statements.
  const server = await startTestServer({ ...NO_RATE_LIMIT, PARLEY_DB_TIMEOUT_SECONDS: "60" });
  const locker = postgres(server.env.DATABASE_URL!, { max: 2, onnotice: () => {} });
  const parleyWaitingOnLocks = async () => {
    const [row] = await locker`
      SELECT count(*)::int AS n FROM pg_stat_activity
      WHERE datname = current_database() AND application_name = 'parley' AND wait_event_type = 'Lock'`;
    return row!.n as number;
  };
  try {
    const tenant = uniqueTenant("deadline");
    for (const protocol of ["grpc", "connect"] as const) {
      const alice = await user(server.url, tenant, "alice", protocol);
      const { chat } = await alice.chats.createChat({ name: `deadline ${protocol}`, memberIds: ["bob"] });
      const chatId = chat!.id;
      await alice.messages.sendMessage({ chatId, text: "before" });

      // SendMessage waits for the chat's row lock, which the test holds.
      const holder = await locker.reserve();
      await holder`BEGIN`;
      await holder`SELECT 1 FROM chats WHERE id = ${chatId} FOR UPDATE`;
      const send = alice.messages.sendMessage({ chatId, text: "too late" }, { timeoutMs: 400 });
      assert.is(await outcome(send), "DeadlineExceeded", `${protocol}: the blocked send`);
      await until(`${protocol}: the blocked INSERT is cancelled in PostgreSQL`, async () => (await parleyWaitingOnLocks()) === 0, 3000);
      await holder`COMMIT`;

      // History reads wait behind an exclusive lock on the table.
      await holder`BEGIN`;
      await holder`LOCK TABLE messages IN ACCESS EXCLUSIVE MODE`;
      const list = alice.messages.listMessages({ chatId }, { timeoutMs: 400 });
      assert.is(await outcome(list), "DeadlineExceeded", `${protocol}: the blocked read`);
      await until(`${protocol}: the blocked SELECT is cancelled in PostgreSQL`, async () => (await parleyWaitingOnLocks()) === 0, 3000);
      await holder`COMMIT`;
      holder.release();

      // Had the send only been abandoned, not cancelled, it would have been stored once the lock went.
      await sleep(300);
      const texts = (await listAll(alice, chatId)).map((m) => m.text);
      assert.equal(texts, ["before"], `${protocol}: the send whose deadline passed was rolled back`);
      const { message } = await alice.messages.sendMessage({ chatId, text: "after" });
      assert.is(message!.sequence, 2n, `${protocol}: the sequence has no gap`);
    }
  } finally {
    // Also ends a transaction a failed assertion left open, which would block the server's shutdown.
    await locker.end({ timeout: 1 });
    await server.destroy();
  }
});

// ---------------------------------------------------------------------------------------------
// 6. Rolling restart (two instances on the same PostgreSQL and NATS)

const rolling = testDatabaseUrl && testNatsUrl ? it : test.skip;
if (!(testDatabaseUrl && testNatsUrl)) {
  console.log("!!! SKIPPED rolling-restart test: set TEST_DATABASE_URL and TEST_NATS_URL (.ci/run does) !!!");
}

rolling("rolling restart - two instances restarted one after the other lose nothing for a client that catches up", async () => {
  let a: TestServer = await startTestServer(NO_RATE_LIMIT);
  let b: TestServer = await a.peer();
  const live = new Set<TestServer>([a, b]);
  const tenant = uniqueTenant("rolling");
  const tokens = new Map<string, string>();
  for (const u of ["alice", "bob", "carol", "dave"]) tokens.set(u, await tokenFor(tenant, u));
  const clientCache = new Map<string, ParleyClient>();
  const clientOn = (instance: TestServer, u: string, protocol: Protocol = "connect-http2") => {
    const key = `${instance.url}|${u}|${protocol}`;
    if (!clientCache.has(key)) clientCache.set(key, parleyClient(instance.url, tokens.get(u)!, protocol));
    return clientCache.get(key)!;
  };
  let turn = 0;
  const pick = (avoid?: TestServer) => {
    const choices = [...live].filter((s) => s !== avoid);
    const list = choices.length > 0 ? choices : [...live];
    return list[turn++ % list.length]!;
  };
  let stopping = false;
  const streamEnds: string[] = [];
  try {
    const general = (await clientOn(a, "alice").chats.createChat({ name: "general", memberIds: ["bob", "carol", "dave"] })).chat!;
    const side = (await clientOn(b, "carol").chats.createChat({ name: "side", memberIds: ["bob", "alice"] })).chat!;
    const chatIds = [general.id, side.id];

    // Senders retry on another instance with the same client_message_id until acknowledged.
    const acked = new Map<string, Message>();
    const senderErrors: string[] = [];
    const senders = ["alice", "carol", "dave"].map((u, k) => (async () => {
      for (let n = 0; !stopping; n++) {
        const chatId = u === "dave" || n % 3 === 0 ? general.id : side.id;
        const cmid = `${u}-${n}`;
        for (let attempt = 0; ; attempt++) {
          const instance = pick();
          try {
            const { message } = await clientOn(instance, u, k === 0 ? "grpc" : "connect").messages.sendMessage(
              { chatId, text: `${u} ${n}`, clientMessageId: cmid }, { timeoutMs: 10_000 });
            acked.set(cmid, message!);
            break;
          } catch (error) {
            // Only what a restart can cause is retried: the instance went away or is shutting down.
            const code = codeOf(error);
            if (attempt > 100 || ![Code.Unavailable, Code.Aborted, Code.Canceled, Code.Unknown, Code.Internal, Code.DeadlineExceeded].includes(code)) {
              throw new Error(`${u} could not send ${cmid}: ${codeName(code)} ${ConnectError.from(error).rawMessage}`);
            }
            await sleep(50);
          }
        }
        await sleep(5);
      }
    })().catch((error) => {
      senderErrors.push(String(error));
    }));

    // Bob follows the catch-up procedure on every (re)subscribe.
    const have = new Map<string, Map<bigint, string>>(chatIds.map((id) => [id, new Map()]));
    const conflicts: string[] = [];
    const record = (m: Message) => {
      const seen = have.get(m.chatId);
      if (!seen) return;
      const before = seen.get(m.sequence);
      if (before !== undefined && before !== m.id) conflicts.push(`two messages with sequence ${m.sequence}`);
      seen.set(m.sequence, m.id);
    };
    let subscribed = 0;
    const receiver = (async () => {
      let instance = a;
      while (!stopping || subscribed === 0) {
        const bob = clientOn(instance, "bob");
        const abort = new AbortController();
        const stream = new StreamReader<Notification>(bob.notifications.subscribe({ includeMessages: true }, { signal: abort.signal }), abort);
        try {
          const first = await stream.next(10_000);
          if (first.event.case !== "ready") throw new Error(`first event ${first.event.case}`);
          const { chats } = await bob.chats.listChats({}, { timeoutMs: 10_000 });
          for (const c of chats) {
            const seen = have.get(c.id);
            if (!seen) continue;
            const had = contiguous(new Set(seen.keys()));
            if (c.lastSequence > had) for (const m of await listAll(bob, c.id, had)) record(m);
          }
          subscribed++;
          for (;;) {
            const n = await stream.next(stopping ? 3000 : 60_000);
            if (n.event.case === "messageCreated" && n.event.value.message) record(n.event.value.message);
          }
        } catch (error) {
          stream.close();
          if (stopping && /no stream item/.test(String(error))) return;
          streamEnds.push(`subscribe: ${codeName(codeOf(error))}`);
          instance = pick(instance);
          await sleep(50);
        }
      }
    })();

    // A watcher resumes WatchMessages with after_sequence on another instance when its stream ends.
    const watched: bigint[] = [];
    const watcher = (async () => {
      let instance = b;
      for (;;) {
        const abort = new AbortController();
        const after = watched.at(-1) ?? 0n;
        const stream = new StreamReader<Message>(
          clientOn(instance, "bob", "grpc").messages.watchMessages({ chatId: general.id, afterSequence: after }, { signal: abort.signal }), abort);
        try {
          for (;;) watched.push((await stream.next(stopping ? 3000 : 60_000)).sequence);
        } catch (error) {
          stream.close();
          if (stopping && /no stream item/.test(String(error))) return;
          streamEnds.push(`watch: ${codeName(codeOf(error))}`);
          instance = pick(instance);
          await sleep(50);
        }
      }
    })();

    await until("traffic flowing", () => acked.size >= 30 && subscribed > 0, 20_000);
    const checkSenders = () => assert.equal(senderErrors, [], "senders keep going");
    // Restart A (graceful: streams end with UNAVAILABLE, in-flight RPCs finish), then B.
    live.delete(a);
    await a.stop();
    a = await a.restart();
    live.add(a);
    await until("traffic after A's restart", () => (checkSenders(), acked.size >= 80), 20_000);
    live.delete(b);
    await b.stop();
    b = await a.peer();
    live.add(b);
    const mark = acked.size;
    await until("traffic after B's restart", () => (checkSenders(), acked.size >= mark + 50), 20_000);
    stopping = true;
    await Promise.all(senders);
    await Promise.all([receiver, watcher]);
    assert.equal(senderErrors, [], "every send is acknowledged in the end (retried on another instance)");
    assert.equal(conflicts, [], "one message per sequence");

    const reader = clientOn(a, "bob");
    for (const chatId of chatIds) {
      const stored = await listAll(reader, chatId);
      assert.equal(stored.map((m) => m.sequence), range(1, stored.length), "stored sequences 1..N");
      const storedCmids = new Set(stored.map((m) => m.clientMessageId));
      assert.is(storedCmids.size, stored.length, "no client_message_id stored twice");
      for (const [cmid, m] of acked) {
        if (m.chatId !== chatId) continue;
        assert.ok(storedCmids.has(cmid), `acknowledged ${cmid} is stored`);
      }
      const got = have.get(chatId)!;
      const missing = stored.filter((m) => got.get(m.sequence) !== m.id).map((m) => m.sequence);
      assert.equal(missing, [], `bob, following the catch-up procedure, has every message of ${chatId === general.id ? "general" : "side"}`);
      if (chatId === general.id) {
        assert.equal(watched, range(1, stored.length), "the resumed WatchMessages saw every message exactly once, in order");
      }
    }
    const unexpected = streamEnds.filter((e) => !e.endsWith("Unavailable"));
    assert.equal(unexpected, [], "streams of a stopping instance end with UNAVAILABLE");
    assert.ok(streamEnds.length >= 2, `both restarts ended streams (${streamEnds.join(", ")})`);
    console.log(`  rolling restart: ${acked.size} messages; stream ends: ${streamEnds.join(", ")}`);
  } finally {
    stopping = true;
    for (const s of [b, a]) await s.destroy().catch(() => {});
  }
});

test.run();
