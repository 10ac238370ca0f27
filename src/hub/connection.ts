import { setMaxListeners } from "node:events";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { WebSocket, type RawData } from "ws";
import { SubscribeRequestSchema, type Notification } from "../../gen/parley/v1/notification_pb.js";
import type { Caller } from "../auth/caller.js";
import type { UnauthenticatedError } from "../errors.js";
import type { Logger } from "../observability/logger.js";
import type { StreamOutput } from "../services/event-queue.js";
import { errorText } from "./error-text.js";
import { eventInvocation } from "./events.js";
import type { HubSocket } from "./hub-socket.js";
import { invokeMethod, isMarkRead, type HubServices } from "./methods.js";
import {
  checkHandshake, closeMessage, completionMessage, handshakeResponse, isObject, MessageType, PING, readInvocation,
  splitRecords, type Invocation,
} from "./protocol.js";

export interface ConnectionSettings {
  keepAliveMs: number;
  timeoutMs: number;
  maxMessageBytes: number;
}

export interface ConnectionDeps {
  services: HubServices;
  log: Logger;
  settings: ConnectionSettings;
}

/** Invocations waiting on one connection before it stops reading from its socket. */
const MAX_QUEUED_INVOCATIONS = 16;
/** Bytes queued for a slow client before forwarding waits for the socket to drain (then the event queue fills up). */
const HIGH_WATER_BYTES = 256 * 1024;

/**
 * One hub connection: handshake, pings and idle timeout, the user's notifications forwarded as
 * invocations, and the client's invocations run one at a time, in order (as ASP.NET does by default).
 */
export class HubConnection {
  readonly closed: Promise<void>;
  private caller: Caller | undefined;
  /** A Close message was sent or the socket is closing: input is ignored from here on. */
  private ending = false;
  private draining = false;
  private buffered = "";
  private queued = 0;
  private invocations: Promise<void> = Promise.resolve();
  private readonly subscription = new AbortController();
  /**
   * ReadUpdated goes to the user's other streams. Per chat, the read marker this connection knows (the
   * results of its own MarkRead, the ReadUpdated events it forwarded): only a marker beyond it is news.
   */
  private readonly readMarkers = new Map<string, bigint>();
  /**
   * While this connection's MarkRead on a chat runs, that chat's ReadUpdated events wait here: the
   * call's own event can arrive before its result (and after it, through NATS, the result filters it).
   */
  private markingRead: { chatId: string; held: Notification[] } | undefined;
  private readonly idle: NodeJS.Timeout;
  private ping: NodeJS.Timeout | undefined;
  private readonly log: Logger;

  constructor(
    private readonly ws: HubSocket,
    readonly id: string,
    private readonly auth: Caller | UnauthenticatedError,
    private readonly deps: ConnectionDeps,
  ) {
    this.log = deps.log.child({ connectionId: id, ...("userId" in auth ? auth : {}) });
    this.closed = new Promise((resolve) => {
      ws.once("close", (code: number) => {
        this.cleanup();
        this.log.debug({ code }, "hub connection closed");
        resolve();
      });
    });
    ws.on("message", (data, isBinary) => this.receive(data, isBinary));
    ws.on("error", (error) => this.log.debug({ err: error }, "hub socket error"));
    ws.onFrameError = (code) => this.sendFinal(frameErrorText(code, deps.settings.maxMessageBytes), false);
    this.idle = setTimeout(() => this.timedOut(), deps.settings.timeoutMs);
    this.log.debug("hub connection opened");
  }

  /** Graceful stop: finish running invocations, then Close with allowReconnect so clients reconnect elsewhere. */
  async shutdown(): Promise<void> {
    if (this.ws.readyState === WebSocket.CLOSED) return;
    // New records are ignored from here on; the socket keeps being read so the close handshake completes.
    this.draining = true;
    this.ws.resume();
    await Promise.race([this.invocations, this.closed]);
    this.end("unavailable: server shutting down (reconnect)", true, 1001, "server shutting down");
    await this.closed;
  }

  private receive(data: RawData, isBinary: boolean): void {
    this.idle.refresh();
    if (this.ending || this.draining) return;
    if (isBinary) return this.fail("binary messages are not supported by the json protocol");
    this.buffered += toText(data);
    const { records, rest } = splitRecords(this.buffered);
    this.buffered = rest;
    if (Buffer.byteLength(rest) > this.deps.settings.maxMessageBytes) {
      return this.fail(`message larger than ${this.deps.settings.maxMessageBytes} bytes`);
    }
    for (const record of records) {
      if (this.ending) return;
      if (this.caller) this.handle(record);
      else this.handshake(record);
    }
  }

  private handshake(record: string): void {
    const error = checkHandshake(record);
    if (error !== undefined) return this.end(error, false, 1002, "handshake failed");
    if (!("userId" in this.auth)) {
      // Complete the handshake, then close with the reason: the official clients report it as the error.
      this.ending = true;
      this.send(handshakeResponse() + closeMessage(`Unauthorized: ${this.auth.message}`));
      return this.closeSocket(1008, "unauthorized");
    }
    // Invocations stop their queries when the connection ends. Each running query listens to this one
    // signal, so Node's warning about many listeners would be a false alarm.
    setMaxListeners(0, this.subscription.signal);
    this.caller = { ...this.auth, signal: this.subscription.signal };
    this.send(handshakeResponse());
    this.ping = setInterval(() => this.send(PING), this.deps.settings.keepAliveMs);
    void this.forward(this.auth);
  }

  private handle(record: string): void {
    let message: unknown;
    try {
      message = JSON.parse(record);
    } catch {
      return this.fail("a message is not valid JSON");
    }
    if (!isObject(message) || typeof message.type !== "number") return this.fail("a message has no numeric type");
    switch (message.type) {
      case MessageType.Invocation:
      case MessageType.StreamInvocation: {
        const invocation = readInvocation(message);
        if (!invocation) return this.fail("an invocation needs a string target and an arguments array");
        return this.enqueue(invocation, message.type === MessageType.StreamInvocation);
      }
      case MessageType.Close:
        this.ending = true;
        return this.closeSocket(1000, "closed by client");
      case MessageType.Ping:
      case MessageType.StreamItem:
      case MessageType.Completion:
      case MessageType.CancelInvocation:
      case MessageType.Ack:
      case MessageType.Sequence:
        return; // nothing to do: no server → client invocations expect results, no streams, no stateful reconnect
      default:
        return this.fail(`unknown message type ${message.type}`);
    }
  }

  private enqueue(invocation: Invocation, streaming: boolean): void {
    this.queued++;
    if (this.queued >= MAX_QUEUED_INVOCATIONS) this.ws.pause();
    this.invocations = this.invocations
      .then(() => this.invoke(invocation, streaming))
      .catch((error) => this.log.error({ err: error }, "hub invocation failed unexpectedly"))
      .then(() => {
        this.queued--;
        this.idle.refresh();
        if (this.ws.isPaused && !this.draining && this.queued < MAX_QUEUED_INVOCATIONS / 2) this.ws.resume();
      });
  }

  private async invoke({ invocationId, target, arguments: args, streamIds }: Invocation, streaming: boolean): Promise<void> {
    const markedChatId = isMarkRead(target) && typeof args[0] === "string" ? args[0] : undefined;
    if (markedChatId !== undefined) this.markingRead = { chatId: markedChatId, held: [] };
    let outcome: { result: unknown } | { error: string } | undefined;
    try {
      try {
        if (streaming) throw new ConnectError(`'${target}' is not a streaming method (the hub has none)`, Code.Unimplemented);
        if (streamIds?.length) throw new ConnectError("client-to-server streams are not supported", Code.Unimplemented);
        outcome = { result: await invokeMethod(this.deps.services, this.caller!, target, args) };
      } catch (error) {
        outcome = { error: errorText(error, this.log) };
      }
      if (invocationId !== undefined) this.send(completionMessage(invocationId, outcome));
      else if ("error" in outcome) this.log.debug({ target, error: outcome.error }, "non-blocking hub invocation failed");
    } finally {
      // Only a caller that receives the result learns the marker from it (not one that sent without an id).
      const learned = invocationId !== undefined && outcome && "result" in outcome ? (outcome.result as ChatJson) : undefined;
      if (markedChatId !== undefined) this.finishMarkingRead(learned);
    }
  }

  private finishMarkingRead(learned: ChatJson | undefined): void {
    const held = this.markingRead?.held ?? [];
    this.markingRead = undefined;
    if (learned) this.rememberReadMarker(learned.id, BigInt(learned.readSequence));
    for (const notification of held) void this.sendEvent(notification);
  }

  /** Records the marker if it is beyond the one this connection knows; true when it was news. */
  private rememberReadMarker(chatId: string, readSequence: bigint): boolean {
    if (readSequence <= (this.readMarkers.get(chatId) ?? -1n)) return false;
    this.readMarkers.set(chatId, readSequence);
    return true;
  }

  /** Whether a ReadUpdated goes out now (see readMarkers); one for a chat being marked read waits. */
  private isNewReadMarker(chatId: string, readSequence: bigint, notification: Notification): boolean {
    if (this.markingRead?.chatId === chatId) {
      this.markingRead.held.push(notification);
      return false;
    }
    return this.rememberReadMarker(chatId, readSequence);
  }

  /** Nothing of a chat reaches the user after leaving it, held events included. */
  private leftChat(chatId: string): void {
    // Forgetting the marker only bounds the map: a member added again starts at last_sequence, never below.
    this.readMarkers.delete(chatId);
    if (this.markingRead?.chatId === chatId) this.markingRead.held = [];
  }

  /** Forwards the caller's notifications; a failed stream ends the connection with its error. */
  private async forward(caller: Caller): Promise<void> {
    const signal = this.subscription.signal;
    try {
      const request = create(SubscribeRequestSchema, { includeMessages: true });
      const output: StreamOutput<Notification> = {
        // Events after Ready are written from the bus callback, without a trip through this loop.
        write: (notification) => this.sendEvent(notification),
        // A client that stopped reading cannot receive a Close message either: drop the socket.
        cutOff: () => this.ws.terminate(),
      };
      for await (const notification of this.deps.services.notifications.subscribe(caller, request, signal, output)) {
        const sent = this.sendEvent(notification);
        if (sent !== true) await sent;
        if (signal.aborted) return;
      }
      if (!signal.aborted) this.end("unavailable: notification stream ended (reconnect)", true, 1011, "stream ended");
    } catch (error) {
      if (signal.aborted) return;
      this.end(errorText(error, this.log), true, 1011, "notification stream failed");
    }
  }

  private timedOut(): void {
    const seconds = this.deps.settings.timeoutMs / 1000;
    if (!this.caller) return this.end(`No handshake within ${seconds} s.`, false, 1002, "handshake timeout");
    const error = `Server timeout elapsed without receiving a message from the client (${seconds} s).`;
    this.end(error, true, 1000, "client timeout");
  }

  private fail(reason: string): void {
    this.log.debug({ reason }, "hub protocol error");
    this.end(`Protocol error: ${reason}`, false, 1002, "protocol error");
  }

  /** Sends the error (a handshake error before the handshake, else a Close message) and closes. */
  private end(error: string, allowReconnect: boolean, code: number, reason: string): void {
    if (this.ending) return;
    this.sendFinal(error, allowReconnect);
    this.closeSocket(code, reason);
  }

  private sendFinal(error: string, allowReconnect: boolean): void {
    if (this.ending) return;
    this.ending = true;
    this.subscription.abort();
    this.send(this.caller ? closeMessage(error, allowReconnect) : handshakeResponse(error));
  }

  private send(text: string): void {
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(text);
  }

  /**
   * Sends an event (not heartbeats, nor a ReadUpdated that is no news here): true when the socket can
   * take more at once, else a promise that resolves when this event has been written (or the socket
   * closed), so a slow client that has fallen behind holds back its own stream and nothing else.
   */
  private sendEvent(notification: Notification): true | Promise<void> {
    const text = eventInvocation(notification);
    if (text === undefined || this.ws.readyState !== WebSocket.OPEN || this.ending) return true;
    const event = notification.event;
    if (event.case === "memberRemoved" && event.value.userId === this.caller?.userId) this.leftChat(event.value.chatId);
    if (event.case === "readUpdated" && !this.isNewReadMarker(event.value.chatId, event.value.readSequence, notification)) return true;
    if (this.ws.bufferedAmount < HIGH_WATER_BYTES) {
      this.ws.send(text);
      return true;
    }
    return Promise.race([new Promise<void>((resolve) => this.ws.send(text, () => resolve())), this.closed]);
  }

  private closeSocket(code: number, reason: string): void {
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) this.ws.close(code, reason);
  }

  private cleanup(): void {
    this.ending = true;
    clearTimeout(this.idle);
    clearInterval(this.ping);
    this.subscription.abort();
  }
}

/** The fields of a MarkRead result (Chat in proto3 JSON) that the read-marker rule needs. */
interface ChatJson {
  id: string;
  readSequence: string;
}

function toText(data: RawData): string {
  if (Buffer.isBuffer(data)) return data.toString("utf8");
  return (Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data)).toString("utf8");
}

function frameErrorText(code: number, maxMessageBytes: number): string {
  if (code === 1009) return `Protocol error: message larger than ${maxMessageBytes} bytes`;
  if (code === 1007) return "Protocol error: a text message is not valid UTF-8";
  return "Protocol error: invalid WebSocket frame";
}
