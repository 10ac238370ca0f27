import { create } from "@bufbuild/protobuf";
import { newId } from "../ids.js";
import {
  GetMessageResponseSchema, ListMessagesResponseSchema, Order, SendMessageResponseSchema,
  type GetMessageRequest, type ListMessagesRequest, type Message, type SendMessageRequest, type WatchMessagesRequest,
} from "../../gen/parley/v1/message_pb.js";
import type { Notification } from "../../gen/parley/v1/notification_pb.js";
import type { Caller } from "../auth/caller.js";
import type { Fanout } from "../bus/fanout.js";
import type { Subjects } from "../bus/subjects.js";
import { NotFoundError } from "../errors.js";
import type { Metrics } from "../observability/metrics.js";
import type { MemberStore } from "../store/member-store.js";
import type { MessageQuery, MessageStore } from "../store/message-store.js";
import { abortReason, EventQueue, type StreamOutput } from "./event-queue.js";
import { withDeadline } from "../deadline.js";
import type { Events } from "./events.js";
import type { PageTokens } from "./page-token.js";
import type { RateLimiter } from "./rate-limiter.js";
import type { StreamSlots } from "./stream-slots.js";
import { MAX_TEXT_LENGTH, RequestCheck } from "./validate.js";

/** Rows read per query while replaying history into a watch stream. */
const REPLAY_BATCH = 500;

export interface StreamLimits {
  /** Events a stream may fall behind before it must recover (see EventQueue). */
  queueLimit: number;
  /**
   * A quiet watch stream checks storage this often: a lost last event (bus outage) or a lost removal
   * is noticed even when no later event arrives.
   */
  watchResyncMs: number;
  /** How long a stream waits for storage before its first message (see withDeadline). */
  storageTimeoutMs: number;
}

export class Messages {
  constructor(
    private readonly store: MessageStore,
    private readonly members: MemberStore,
    private readonly events: Events,
    private readonly fanout: Fanout,
    private readonly subjects: Subjects,
    private readonly pageTokens: PageTokens,
    private readonly rateLimiter: RateLimiter,
    private readonly metrics: Metrics,
    private readonly limits: StreamLimits,
    private readonly streamSlots: StreamSlots,
  ) {}

  async sendMessage(caller: Caller, req: SendMessageRequest) {
    const check = new RequestCheck();
    const chatId = check.id("chat_id", req.chatId);
    const text = check.text("text", req.text, { min: 1, max: MAX_TEXT_LENGTH });
    const clientMessageId = check.clientMessageId("client_message_id", req.clientMessageId);
    check.done();
    this.rateLimiter.take(`${caller.tenantId}\u0000${caller.userId}`);
    // The store answers a chat's sends in sequence order (see MessageStore), and messageCreated hands
    // its event to the bus before it first awaits: so each chat's events are published in order.
    const { message, duplicate } = await this.store.send(caller.tenantId, chatId, newId(), caller.userId, text, clientMessageId, caller.signal);
    if (!duplicate) {
      this.metrics.messagesSent.inc();
      await this.events.messageCreated(caller.tenantId, message);
    }
    return create(SendMessageResponseSchema, { message });
  }

  async listMessages(caller: Caller, req: ListMessagesRequest) {
    const check = new RequestCheck();
    const chatId = check.id("chat_id", req.chatId);
    const pageSize = check.pageSize(req.pageSize);
    const startTime = check.time("start_time", req.startTime);
    const endTime = check.time("end_time", req.endTime);
    const afterSequence = check.sequence("after_sequence", req.afterSequence);
    const beforeSequence = check.sequence("before_sequence", req.beforeSequence);
    if (startTime && endTime && startTime > endTime) check.fail("start_time", "must not be after end_time");
    if (!Object.values(Order).includes(req.order)) check.fail("order", "unknown order");
    check.done();
    const newestFirst = req.order !== Order.OLDEST_FIRST;
    const binding = ["ListMessages", chatId, newestFirst, startTime?.getTime(), endTime?.getTime(), afterSequence, beforeSequence];
    const position = this.pageTokens.decode(caller.tenantId, binding, req.pageToken);
    const query: MessageQuery = { startTime, endTime, afterSequence, beforeSequence, newestFirst, visibleTo: caller.userId };
    if (position) {
      const cursor = BigInt(position[0]!);
      if (newestFirst) query.beforeSequence = cursor;
      else query.afterSequence = cursor;
    }
    const rows = await this.store.list(caller.tenantId, chatId, query, pageSize + 1, caller.signal);
    // No rows: an empty range, or the caller is not a member (the query checked it).
    if (rows.length === 0 && !(await this.members.isMember(caller.tenantId, chatId, caller.userId, caller.signal))) {
      throw new NotFoundError("chat");
    }
    const messages = rows.slice(0, pageSize);
    const more = rows.length > pageSize;
    return create(ListMessagesResponseSchema, {
      messages,
      nextPageToken: more ? this.pageTokens.encode(caller.tenantId, binding, [messages.at(-1)!.sequence]) : "",
    });
  }

  async getMessage(caller: Caller, req: GetMessageRequest) {
    const check = new RequestCheck();
    const chatId = check.id("chat_id", req.chatId);
    const messageId = check.id("message_id", req.messageId);
    check.done();
    const message = await this.store.get(caller.tenantId, caller.userId, chatId, messageId, caller.signal);
    if (!message) {
      const member = await this.members.isMember(caller.tenantId, chatId, caller.userId, caller.signal);
      throw new NotFoundError(member ? "message" : "chat");
    }
    return create(GetMessageResponseSchema, { message });
  }

  /**
   * Stored messages after after_sequence, then live ones. The bus listener starts before the replay,
   * and every live event is checked against the last sequence sent: older ones are skipped, and a
   * jump forward (a lost or dropped event) is filled from the database, so the stream has no gap and
   * no duplicate.
   */
  async *watchMessages(caller: Caller, req: WatchMessagesRequest, signal: AbortSignal, output: StreamOutput<Message> = {}): AsyncGenerator<Message> {
    const check = new RequestCheck();
    const chatId = check.id("chat_id", req.chatId);
    let last = check.sequence("after_sequence", req.afterSequence);
    check.done();
    const { tenantId, userId } = caller;
    const member = await withDeadline(this.members.isMember(tenantId, chatId, userId, signal), this.limits.storageTimeoutMs, "storage");
    if (!member) throw new NotFoundError("chat");
    const queue = new EventQueue<Notification>(this.limits.queueLimit);
    const releaseSlot = this.streamSlots.acquire(caller, (error) => queue.fail(error), output.cutOff);
    const stopListening = this.fanout.listen(this.subjects.chat(tenantId, chatId), (event) => queue.push(event));
    // Events published while the bus was away are lost: re-read storage once it is back.
    const stopWatchingBus = this.fanout.onConnectionChange((connected) => connected && queue.markLost());
    this.metrics.activeStreams.inc({ kind: "watch" });
    try {
      const catchUp = async function* (this: Messages, before?: bigint) {
        for (;;) {
          const batch = await this.store.list(
            tenantId, chatId,
            { afterSequence: last, beforeSequence: before ?? 0n, newestFirst: false },
            REPLAY_BATCH, signal,
          );
          for (const message of batch) {
            last = message.sequence;
            yield message;
          }
          if (batch.length < REPLAY_BATCH) return;
        }
      }.bind(this);
      yield* catchUp();
      for (;;) {
        const event = await queue.next(signal, this.limits.watchResyncMs);
        if (event === "aborted") throw abortReason(signal);
        if (event === "overflow" || event === "idle") {
          // Events were dropped (this stream fell behind) or may have been lost: storage has them all.
          if (!(await this.members.isMember(tenantId, chatId, userId, signal))) throw new NotFoundError("chat");
          yield* catchUp();
          continue;
        }
        const e = event.event;
        if (e.case === "memberRemoved" && e.value.userId === userId) throw new NotFoundError("chat");
        if (e.case !== "messageCreated" || !e.value.message) continue;
        const sequence = e.value.sequence;
        if (sequence <= last) continue;
        if (sequence > last + 1n) yield* catchUp(sequence);
        if (sequence === last + 1n) {
          last = sequence;
          const written = output.write?.(e.value.message);
          if (written === undefined) yield e.value.message;
          else if (written !== true) await written;
        }
      }
    } finally {
      queue.dispose();
      releaseSlot();
      stopWatchingBus();
      stopListening();
      this.metrics.activeStreams.dec({ kind: "watch" });
    }
  }
}
