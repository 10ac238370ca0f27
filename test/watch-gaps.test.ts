// WatchMessages must deliver every message even when the bus loses events or the stream falls behind.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { create } from "@bufbuild/protobuf";
import { SendMessageRequestSchema, WatchMessagesRequestSchema, type Message } from "../gen/parley/v1/message_pb.js";
import type { Bus } from "../src/bus/bus.js";
import { Fanout } from "../src/bus/fanout.js";
import { MemoryBus } from "../src/bus/memory-bus.js";
import { Subjects } from "../src/bus/subjects.js";
import { createLogger } from "../src/observability/logger.js";
import { Metrics } from "../src/observability/metrics.js";
import { Events } from "../src/services/events.js";
import { Messages } from "../src/services/messages.js";
import { PageTokens } from "../src/services/page-token.js";
import { RateLimiter } from "../src/services/rate-limiter.js";
import { StreamSlots } from "../src/services/stream-slots.js";
import { ChatStore } from "../src/store/chat-store.js";
import type { Database } from "../src/store/database.js";
import { MemberStore } from "../src/store/member-store.js";
import { MessageStore } from "../src/store/message-store.js";
import { useStoreTestDatabase } from "./support/server.js";

/** Delivers only the publishes that `keep` accepts, like a bus that loses messages. */
class LossyBus extends MemoryBus {
  private count = 0;
  constructor(private readonly keep: (n: number) => boolean) {
    super();
  }
  override async publish(subject: string, data: Uint8Array) {
    if (this.keep(++this.count)) await super.publish(subject, data);
  }
}

const log = createLogger("silent");
let db: Database;
useStoreTestDatabase(test, (opened) => (db = opened));

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
  const service = messagesService(new LossyBus((n) => n % 3 !== 0), 1000);
  assert.equal(await watchAndSend(service, 60, 0), oneToN(60));
});

test("watch - a stream that falls behind its queue limit resynchronises from storage", async () => {
  const service = messagesService(new MemoryBus(), 5);
  assert.equal(await watchAndSend(service, 80, 2), oneToN(80));
});

test.run();
