// Subscribe follows chats joined while subscribed, and must not miss their first messages although
// the bus subscription to a new chat becomes active only some time after the join event arrived.
import { test } from "uvu";
import * as assert from "uvu/assert";
import { create } from "@bufbuild/protobuf";
import { SubscribeRequestSchema, type Notification } from "../gen/parley/v1/notification_pb.js";
import { Fanout } from "../src/bus/fanout.js";
import { MemoryBus } from "../src/bus/memory-bus.js";
import { Subjects } from "../src/bus/subjects.js";
import { createLogger } from "../src/observability/logger.js";
import { Metrics } from "../src/observability/metrics.js";
import { Events } from "../src/services/events.js";
import { Notifications } from "../src/services/notifications.js";
import { StreamSlots } from "../src/services/stream-slots.js";
import { ChatStore } from "../src/store/chat-store.js";
import type { Database } from "../src/store/database.js";
import { MemberStore } from "../src/store/member-store.js";
import { MessageStore } from "../src/store/message-store.js";
import { useStoreTestDatabase } from "./support/server.js";

/**
 * Like NATS, where a SUB takes effect only when the server has read it: while held, new subscriptions
 * stay inactive (what is published to them is lost) until flush() is let through by release().
 */
class LateBus extends MemoryBus {
  private pending: (() => void)[] = [];
  private gate: Promise<void> = Promise.resolve();
  private open: () => void = () => {};
  hold() {
    this.gate = new Promise((resolve) => (this.open = resolve));
  }
  release() {
    this.open();
  }
  override subscribe(subject: string, onMessage: (data: Uint8Array) => void) {
    let active = false;
    const unsubscribe = super.subscribe(subject, (data) => active && onMessage(data));
    this.pending.push(() => (active = true));
    return unsubscribe;
  }
  override async flush() {
    await this.gate;
    for (const activate of this.pending.splice(0)) activate();
  }
}

const log = createLogger("silent");
let db: Database;
useStoreTestDatabase(test, (opened) => (db = opened));

function setUp() {
  const bus = new LateBus();
  const metrics = new Metrics();
  const subjects = new Subjects("join");
  const messages = new MessageStore(db);
  const notifications = new Notifications(
    new MemberStore(db), messages, new Fanout(bus, metrics, log), subjects, metrics,
    { heartbeatSeconds: 3600, queueLimit: 1000, storageTimeoutMs: 5000 }, new StreamSlots(10),
  );
  const events = new Events(bus, subjects, metrics, log);
  const tenant = `join-${Date.now()}-${Math.random().toString(36).slice(2)}`;
  /** Stores a message and publishes it, as SendMessage does. */
  const send = async (chatId: string, text: string) => {
    const { message } = await messages.send(tenant, chatId, crypto.randomUUID(), "alice", text, "");
    await events.messageCreated(tenant, message);
  };
  /** Bob's stream, given to body and ended (with the bus let through) whatever body does. */
  const asBob = async (body: (stream: AsyncGenerator<Notification>) => Promise<void>) => {
    const abort = new AbortController();
    const stream = notifications.subscribe({ tenantId: tenant, userId: "bob" }, create(SubscribeRequestSchema, { includeMessages: true }), abort.signal);
    try {
      await body(stream);
    } finally {
      bus.release();
      abort.abort();
      await stream.return(undefined).catch(() => {});
    }
  };
  return { bus, events, tenant, send, asBob };
}

/** What a stream delivers: the event's case, and the message text for MessageCreated. */
function describe(n: Notification): string {
  return n.event.case === "messageCreated" ? `message ${n.event.value.message?.text}` : n.event.case ?? "?";
}

async function next(stream: AsyncGenerator<Notification>): Promise<string> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<string>((resolve) => (timer = setTimeout(() => resolve("nothing within 3 s"), 3000)));
  const event = stream.next().then((r) => (r.done ? "end" : describe(r.value)));
  try {
    return await Promise.race([event, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

test("subscribe - Ready comes only once the stream's bus subscriptions are active", async () => {
  const { bus, asBob } = setUp();
  bus.hold();
  await asBob(async (stream) => {
    let released = false;
    const ready = next(stream).then((event) => ({ event, released }));
    await new Promise((resolve) => setTimeout(resolve, 100));
    released = true;
    bus.release();
    assert.equal(await ready, { event: "ready", released: true });
  });
});

test("subscribe - the first message of a chat created with the subscriber arrives although the chat's subscription started late", async () => {
  const { bus, events, tenant, send, asBob } = setUp();
  await asBob(async (stream) => {
    assert.is(await next(stream), "ready");
    bus.hold();
    const { chat } = await new ChatStore(db).create(tenant, crypto.randomUUID(), "alice", "late", ["bob"]);
    await events.chatCreated(tenant, chat.id, chat.name, "alice", ["alice", "bob"]);
    assert.is(await next(stream), "chatCreated");
    await send(chat.id, "first"); // published while the stream's chat subscription is not yet active
    bus.release();
    await send(chat.id, "second");
    assert.equal([await next(stream), await next(stream)], ["message first", "message second"]);
  });
});

test("subscribe - a member added to a chat gets the messages sent after the join, not those before", async () => {
  const { bus, events, tenant, send, asBob } = setUp();
  const { chat } = await new ChatStore(db).create(tenant, crypto.randomUUID(), "alice", "late", []);
  await send(chat.id, "before the join");
  await asBob(async (stream) => {
    assert.is(await next(stream), "ready");
    bus.hold();
    await new MemberStore(db).add(tenant, "alice", chat.id, ["bob"], 100);
    await events.membersAdded(tenant, chat.id, ["bob"], "alice");
    assert.is(await next(stream), "memberAdded");
    await send(chat.id, "after the join");
    bus.release();
    await send(chat.id, "live");
    assert.equal([await next(stream), await next(stream)], ["message after the join", "message live"]);
  });
});

test.run();
