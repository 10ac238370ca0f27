// Browser side of test/browser.test.ts: Connect-Web clients (Connect or gRPC-Web transport) driven by
// the test through window.parleyProbe. Results cross to Node as proto3 JSON.
import { toJson } from "@bufbuild/protobuf";
import { createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-web";
import { ChatSchema, ChatService } from "../../gen/parley/v1/chat_pb.js";
import { ListMessagesResponseSchema, MessageSchema, MessageService } from "../../gen/parley/v1/message_pb.js";
import { NotificationSchema, NotificationService } from "../../gen/parley/v1/notification_pb.js";
import { Inbox, type Json } from "./inbox.js";

/** Every request the transports made, with its content type: proves which protocol was spoken. */
const requests: { path: string; contentType: string }[] = [];
const recordingFetch: typeof fetch = (input, init) => {
  const url = new URL(input instanceof Request ? input.url : String(input));
  requests.push({ path: url.pathname, contentType: new Headers(init?.headers).get("content-type") ?? "" });
  return fetch(input, init);
};

function clients(baseUrl: string, token: string, protocol: "connect" | "grpc-web") {
  const auth: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
  const options = { baseUrl, interceptors: [auth], fetch: recordingFetch };
  const transport = protocol === "grpc-web" ? createGrpcWebTransport(options) : createConnectTransport(options);
  return {
    chats: createClient(ChatService, transport),
    messages: createClient(MessageService, transport),
    notifications: createClient(NotificationService, transport),
  };
}

let api: ReturnType<typeof clients> | undefined;
const inbox = new Inbox();
const stop = new AbortController();

function connected() {
  if (!api) throw new Error("call start() first");
  return api;
}

const probe = {
  requests,
  /** Creates the clients and opens Subscribe; resolves with the first notification (Ready). */
  async start(baseUrl: string, token: string, protocol: "connect" | "grpc-web"): Promise<Json> {
    api = clients(baseUrl, token, protocol);
    const stream = api.notifications.subscribe({ includeMessages: true }, { signal: stop.signal });
    void (async () => {
      try {
        for await (const n of stream) inbox.push(toJson(NotificationSchema, n));
      } catch (error) {
        inbox.fail(String(error));
      }
    })();
    return probe.nextEvent(5000);
  },
  nextEvent(timeoutMs: number): Promise<Json> {
    return inbox.next(timeoutMs);
  },
  async createChat(name: string, memberIds: string[]): Promise<Json> {
    const { chat } = await connected().chats.createChat({ name, memberIds });
    return toJson(ChatSchema, chat!);
  },
  async sendMessage(chatId: string, text: string): Promise<Json> {
    const { message } = await connected().messages.sendMessage({ chatId, text, clientMessageId: crypto.randomUUID() });
    return toJson(MessageSchema, message!);
  },
  async listMessages(chatId: string): Promise<Json> {
    return toJson(ListMessagesResponseSchema, await connected().messages.listMessages({ chatId, pageSize: 10 }));
  },
  stop(): void {
    stop.abort();
  },
};

declare global {
  interface Window {
    parleyProbe: typeof probe;
  }
}
window.parleyProbe = probe;
