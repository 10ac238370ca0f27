// Browser side of test/browser.test.ts: Google's grpc-web client (not Connect's) in its default text
// mode, driven through window.grpcWebProbe. Messages are encoded with the generated protobuf-es code.
import { create, fromBinary, toBinary, toJson, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { GrpcWebClientBase, MethodDescriptor, type ClientReadableStream } from "grpc-web";
import { ChatSchema, CreateChatRequestSchema, CreateChatResponseSchema } from "../../gen/parley/v1/chat_pb.js";
import { NotificationSchema, SubscribeRequestSchema, type Notification } from "../../gen/parley/v1/notification_pb.js";
import { Inbox, type Json } from "./inbox.js";

/** grpc-web calls a message's serializer and the response's deserializer; protobuf-es provides both. */
function method<I extends DescMessage, O extends DescMessage>(path: string, kind: "unary" | "server_streaming", input: I, output: O) {
  return new MethodDescriptor<MessageShape<I>, MessageShape<O>>(
    path, kind, Object as never, Object as never,
    (request: MessageShape<I>) => toBinary(input, request),
    (bytes: Uint8Array) => fromBinary(output, bytes),
  );
}

const createChatMethod = method("/parley.v1.ChatService/CreateChat", "unary", CreateChatRequestSchema, CreateChatResponseSchema);
const subscribeMethod = method("/parley.v1.NotificationService/Subscribe", "server_streaming", SubscribeRequestSchema, NotificationSchema);

const client = new GrpcWebClientBase({ format: "text" });
let target: { baseUrl: string; metadata: { authorization: string } } | undefined;
let stream: ClientReadableStream<Notification> | undefined;
const inbox = new Inbox();

const probe = {
  /** Opens Subscribe; resolves with the first notification (Ready). */
  start(baseUrl: string, token: string): Promise<Json> {
    target = { baseUrl, metadata: { authorization: `Bearer ${token}` } };
    stream = client.serverStreaming(`${baseUrl}${subscribeMethod.getName()}`,
      create(SubscribeRequestSchema, { includeMessages: true }), target.metadata, subscribeMethod);
    stream.on("data", (n) => inbox.push(toJson(NotificationSchema, n)));
    stream.on("error", (error) => inbox.fail(`${error.code} ${error.message}`));
    return probe.nextEvent(5000);
  },
  nextEvent(timeoutMs: number): Promise<Json> {
    return inbox.next(timeoutMs);
  },
  async createChat(name: string, memberIds: string[]): Promise<Json> {
    if (!target) throw new Error("call start() first");
    const response = await client.unaryCall(`${target.baseUrl}${createChatMethod.getName()}`,
      create(CreateChatRequestSchema, { name, memberIds }), target.metadata, createChatMethod);
    return toJson(ChatSchema, response.chat!);
  },
  stop(): void {
    stream?.cancel();
  },
};

declare global {
  interface Window {
    grpcWebProbe: typeof probe;
  }
}
window.grpcWebProbe = probe;
