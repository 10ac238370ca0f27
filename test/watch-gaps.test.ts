// WatchMessages must deliver every message even when the bus loses events or the stream falls behind.
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { create } from "@bufbuild/protobuf";
import { SendMessageRequestSchema, WatchMessagesRequestSchema, type Message } from "../gen/parley/v1/message_pb.js";
import type { Bus } from "../src/bus/bus.js";
import { Fanout } from "../src/bus/fanout.js";
import { MemoryBus } from "../src/bus/memory-bus.js";
import { Subjects } from "../src/bus/subjects.js";
import { loadConfig } from "../src/config.js";
import { createLogger } from "../src/observability/logger.js";
import { Metrics } from "../src/observability/metrics.js";
import { Events } from "../src/services/events.js";
import { Messages } from "../src/services/messages.js";
import { PageTokens } from "../src/services/page-token.js";
import { RateLimiter } from "../src/services/rate-limiter.js";
import { StreamSlots } from "../src/services/stream-slots.js";
import { ChatStore } from "../src/store/chat-store.js";
import { openDatabase, type Database } from "../src/store/database.js";
import { MemberStore } from "../src/store/member-store.js";
import { MessageStore } from "../src/store/message-store.js";
import { createTestDatabase, testDatabaseUrl } from "./support/server.js";

/** Delivers only the publishes that `keep` accepts, like a bus that loses messages. */
class LossyBus implements Bus {
  private count = 0;
  constructor(private readonly inner: Bus, private readonly keep: (n: number) => boolean) {}
  async publish(subject: string, data: Uint8Array) {
    if (this.keep(++this.count)) await this.inner.publish(subject, data);
  }
  subscribe(subject: string, onMessage: (data: Uint8Array) => void) {
    return this.inner.subscribe(subject, onMessage);
  }
  flush() {
    return this.inner.flush();
  }
  ping() {
    return this.inner.ping();
  }
  get connected() {
    return this.inner.connected;
  }
  onConnectionChange(listener: (connected: boolean) => void) {
    return this.inner.onConnectionChange(listener);
  }
  close() {
    return this.inner.close();
  }
}

const log = createLogger("silent");
let db: Database;
let dataDir: string;
let drop: (() => Promise<void>) | undefined;

test.before(async () => {
  dataDir = await fs.mkdtemp(path.join(os.tmpdir(), "parley-gaps-"));
  const database = testDatabaseUrl ? await createTestDatabase(testDatabaseUrl) : undefined;
  drop = database?.drop;
  db = await openDatabase(loadConfig({ PARLEY_DATA_DIR: dataDir, DATABASE_URL: database?.url, PARLEY_JWT_SECRET: "x".repeat(32) }), log);
});
test.after(async () => {
  await db.close();
  await drop?.();
  await fs.rm(dataDir, { recursive: true, force: true });
});

function messagesService(bus: Bus, queueLimit: number) {
  const metrics = new Metrics();
  const subjects = new Subjects("gaps");
  return new Messages(
    new MessageStore(db), new MemberStore(db), new Events(bus, subjects, metrics, log),
    new Fanout(bus, metrics, log), subjects, new PageTokens(Buffer.alloc(32)),
    new RateLimiter(1e9, 1e9), metrics, { queueLimit, watchResyncMs: 200, storageTimeoutMs: 5000 }, new StreamSlots(10),
  );
}

async function watchAndSend(service: Messages, count: number, readDelayMs: number): Promise<bigint[]> {
  const caller = { tenantId: `gaps-${Date.now()}-${Math.random().toString(36).slice(2)}`, userId: "alice" };
  const { chat } = await new ChatStore(db).create(caller.tenantId, crypto.randomUUID(), "alice", "gaps", ["alice"]);
  const abort = new AbortController();
  const stream = service.watchMessages(caller, create(WatchMessagesRequestSchema, { chatId: chat.id }), abort.signal);
  const first = stream.next(); // starts the stream: it listens and replays (nothing yet)
  const sending = (async () => {
    for (let i = 0; i < count; i++) {
      await service.sendMessage(caller, create(SendMessageRequestSchema, { chatId: chat.id, text: `m${i}` }));
    }
  })();
  const seen: bigint[] = [((await first).value as Message).sequence];
  while (seen.length < count) {
    if (readDelayMs > 0) await new Promise((resolve) => setTimeout(resolve, readDelayMs));
    seen.push(((await stream.next()).value as Message).sequence);
  }
  await sending;
  abort.abort();
  await stream.return(undefined);
  return seen;
}

const oneToN = (n: number) => Array.from({ length: n }, (_, i) => BigInt(i + 1));

test("watch - events lost by the bus are filled from storage, in order, without duplicates", async () => {
  const service = messagesService(new LossyBus(new MemoryBus(), (n) => n % 3 !== 0), 1000);
  assert.equal(await watchAndSend(service, 60, 0), oneToN(60));
});

test("watch - a stream that falls behind its queue limit resynchronises from storage", async () => {
  const service = messagesService(new MemoryBus(), 5);
  assert.equal(await watchAndSend(service, 80, 2), oneToN(80));
});

test.run();
