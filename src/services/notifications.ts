import { create } from "@bufbuild/protobuf";
import { timestampNow } from "@bufbuild/protobuf/wkt";
import { NotificationSchema, type Notification, type SubscribeRequest } from "../../gen/parley/v1/notification_pb.js";
import type { Caller } from "../auth/caller.js";
import type { Fanout } from "../bus/fanout.js";
import type { Subjects } from "../bus/subjects.js";
import { ResourceExhaustedError, UnavailableError } from "../errors.js";
import type { Metrics } from "../observability/metrics.js";
import type { MemberStore } from "../store/member-store.js";
import type { MessageStore } from "../store/message-store.js";
import { messageCreatedEvent } from "./events.js";
import { abortReason, EventQueue, type StreamOutput } from "./event-queue.js";
import { withDeadline } from "../deadline.js";
import type { StreamSlots } from "./stream-slots.js";

export interface NotificationLimits {
  heartbeatSeconds: number;
  queueLimit: number;
  storageTimeoutMs: number;
}

/** How long a stream that fell behind may take to read its RESOURCE_EXHAUSTED before it is cut off. */
const STALLED_GRACE_MS = 2000;

/** A chat a stream follows. */
interface FollowedChat {
  stop: () => void;
  /** Live MessageCreated events up to this sequence were delivered from storage. */
  readUpTo: bigint;
  /** While storage is read, the chat's live events wait here. */
  held?: Notification[];
}

/**
 * One user's event stream. It listens to the user's subject (chats created with, joined, left, read
 * markers) and to the subject of each chat the user is in, adding and dropping chats as membership
 * events arrive. Events about the user's own membership come from the user subject only, so none is
 * delivered twice.
 *
 * A chat joined while subscribed is followed from the moment its join event arrives, but its messages
 * may be published before this instance's bus subscription to the chat is active (another instance,
 * or the next send, can be quicker): once it is active, the messages stored since the join are read
 * and delivered, and live ones already read are skipped.
 */
export class Notifications {
  constructor(
    private readonly members: MemberStore,
    private readonly messages: Pick<MessageStore, "sinceJoin">,
    private readonly fanout: Fanout,
    private readonly subjects: Subjects,
    private readonly metrics: Metrics,
    private readonly limits: NotificationLimits,
    private readonly streamSlots: StreamSlots,
  ) {}

  /**
   * A client that falls queueLimit events behind gets RESOURCE_EXHAUSTED when it next reads; one that
   * has stopped reading altogether is cut off at the transport (output.cutOff) so it holds no slot for ever.
   */
  async *subscribe(caller: Caller, req: SubscribeRequest, signal: AbortSignal, output: StreamOutput<Notification> = {}): AsyncGenerator<Notification> {
    const { tenantId, userId } = caller;
    // Ready promises that nothing is missed: not while the bus is down.
    if (!this.fanout.connected) throw new UnavailableError("event bus unavailable (retry shortly)");
    const fellBehind = () => new ResourceExhaustedError(
      `stream closed, the client fell more than ${this.limits.queueLimit} events behind (resubscribe and catch up)`,
    );
    let stalled: NodeJS.Timeout | undefined;
    const queue = new EventQueue<Notification>(this.limits.queueLimit, () => {
      stalled = setTimeout(() => output.cutOff?.(fellBehind()), STALLED_GRACE_MS);
    });
    const releaseSlot = this.streamSlots.acquire(caller, (error) => queue.fail(error), output.cutOff);
    const chats = new Map<string, FollowedChat>();
    /** Chats whose membership changed while the initial list was loading: the event wins. */
    const changedDuringSetup = new Set<string>();
    let settingUp = true;

    const listenToChat = (chatId: string, joined: boolean) => {
      if (chats.has(chatId)) return;
      const chat: FollowedChat = { stop: () => {}, readUpTo: 0n, held: joined ? [] : undefined };
      chat.stop = this.fanout.listen(this.subjects.chat(tenantId, chatId), (event) => {
        const e = event.event;
        if ((e.case === "memberAdded" || e.case === "memberRemoved") && e.value.userId === userId) return;
        if (chat.held) chat.held.push(event);
        else deliverLive(chat, event);
      });
      chats.set(chatId, chat);
      if (joined) void catchUp(chatId, chat);
    };
    /** A chat's live event, unless storage delivered it already (see catchUp). */
    const deliverLive = (chat: FollowedChat, event: Notification) => {
      const e = event.event;
      if (e.case !== "messageCreated" || e.value.sequence > chat.readUpTo) queue.push(event);
    };
    const catchUp = async (chatId: string, chat: FollowedChat) => {
      try {
        const stored = await withDeadline(
          this.fanout.active().then(() => this.messages.sinceJoin(tenantId, chatId, userId, signal)),
          this.limits.storageTimeoutMs, "storage",
        );
        if (chats.get(chatId) !== chat) return; // left meanwhile
        for (const message of stored) {
          queue.push(create(NotificationSchema, { chatId, time: message.createTime, event: messageCreatedEvent(message) }));
        }
        chat.readUpTo = stored.at(-1)?.sequence ?? 0n;
        const held = chat.held!;
        chat.held = undefined;
        for (const event of held) deliverLive(chat, event);
      } catch (error) {
        // Without storage the stream cannot promise it missed nothing: the client resubscribes.
        if (!signal.aborted) queue.fail(new UnavailableError(`cannot catch up on a joined chat (${(error as Error).message})`));
      }
    };
    const stopListeningToChat = (chatId: string) => {
      chats.get(chatId)?.stop();
      chats.delete(chatId);
    };
    const stopUser = this.fanout.listen(this.subjects.user(tenantId, userId), (event) => {
      const e = event.event;
      if (settingUp) changedDuringSetup.add(event.chatId);
      if (e.case === "chatCreated" || e.case === "memberAdded") listenToChat(event.chatId, true);
      if (e.case === "memberRemoved") stopListeningToChat(event.chatId);
      queue.push(event);
    });
    const stopWatchingBus = this.fanout.onConnectionChange((connected) => {
      if (!connected) queue.fail(new UnavailableError("event bus connection lost (resubscribe and catch up)"));
    });
    this.metrics.activeStreams.inc({ kind: "subscribe" });
    const heartbeat = setInterval(
      () => queue.push(create(NotificationSchema, { time: timestampNow(), event: { case: "heartbeat", value: {} } })),
      this.limits.heartbeatSeconds * 1000,
    );
    try {
      const chatIds = await withDeadline(this.members.chatIdsOf(tenantId, userId, signal), this.limits.storageTimeoutMs, "storage");
      for (const chatId of chatIds) {
        if (!changedDuringSetup.has(chatId)) listenToChat(chatId, false);
      }
      settingUp = false;
      // Ready promises that nothing is missed from here on: every subscription must be active first.
      await withDeadline(this.fanout.active(), this.limits.storageTimeoutMs, "event bus");
      yield create(NotificationSchema, { time: timestampNow(), event: { case: "ready", value: {} } });
      const shape = (event: Notification) => (req.includeMessages ? event : withoutMessage(event));
      /** Set when a bus callback found the transport full: nothing more is written until it resolves. */
      let draining: Promise<void> | undefined;
      // Connect has written Ready (it asked for the next message), so while this loop waits, the bus
      // callbacks may write events themselves, in arrival order, until the transport is full; from
      // then on events queue and this loop writes them once the transport has drained.
      const writeNow = (event: Notification): boolean => {
        const written = output.write!(shape(event));
        if (written === undefined) return false;
        if (written !== true) {
          draining = written;
          queue.sink = undefined;
        }
        return true;
      };
      for (;;) {
        if (output.write) queue.sink = writeNow;
        const event = await queue.next(signal);
        queue.sink = undefined;
        if (event === "aborted") throw abortReason(signal);
        if (event === "overflow") throw fellBehind();
        if (draining) await draining;
        draining = undefined;
        const notification = shape(event);
        const written = output.write?.(notification);
        if (written === undefined) yield notification;
        else if (written !== true) await written;
      }
    } finally {
      clearTimeout(stalled);
      releaseSlot();
      stopWatchingBus();
      clearInterval(heartbeat);
      stopUser();
      for (const chat of chats.values()) chat.stop();
      this.metrics.activeStreams.dec({ kind: "subscribe" });
    }
  }
}

const withoutMessages = new WeakMap<Notification, Notification>();

/**
 * MessageCreated without the message itself (include_messages off), made once per event and shared
 * by every stream that wants it, so that it is encoded once too.
 */
function withoutMessage(event: Notification): Notification {
  if (event.event.case !== "messageCreated") return event;
  let stripped = withoutMessages.get(event);
  if (stripped === undefined) {
    const { chatId, messageId, sequence, senderId } = event.event.value;
    stripped = create(NotificationSchema, {
      chatId: event.chatId,
      time: event.time,
      event: { case: "messageCreated", value: { chatId, messageId, sequence, senderId } },
    });
    withoutMessages.set(event, stripped);
  }
  return stripped;
}
