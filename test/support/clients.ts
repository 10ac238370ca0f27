import path from "node:path";
import { fileURLToPath } from "node:url";
import { createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { ChatService } from "../../gen/parley/v1/chat_pb.js";
import { MemberService } from "../../gen/parley/v1/member_pb.js";
import { MessageService } from "../../gen/parley/v1/message_pb.js";
import { NotificationService } from "../../gen/parley/v1/notification_pb.js";

const protoDir = path.join(path.dirname(fileURLToPath(import.meta.url)), "../../proto");

/** Every way a client reaches the RPCs: each is tested wherever a test says "every protocol". */
export const protocols = ["connect", "connect-binary", "connect-http2", "connect-binary-http2", "grpc", "grpc-web"] as const;
export type Protocol = (typeof protocols)[number];

/** Sends the token as a bearer token on every call. */
export function bearer(token: string): Interceptor {
  return (next) => (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
}

export function connectTransport(baseUrl: string, token: string, protocol: Protocol = "connect"): Transport {
  const interceptors = [bearer(token)];
  switch (protocol) {
    case "connect":
      return createConnectTransport({ baseUrl, httpVersion: "1.1", interceptors });
    case "connect-binary":
      return createConnectTransport({ baseUrl, httpVersion: "1.1", useBinaryFormat: true, interceptors });
    case "connect-http2":
      return createConnectTransport({ baseUrl, httpVersion: "2", interceptors });
    case "connect-binary-http2":
      return createConnectTransport({ baseUrl, httpVersion: "2", useBinaryFormat: true, interceptors });
    case "grpc":
      return createGrpcTransport({ baseUrl, interceptors });
    case "grpc-web":
      return createGrpcWebTransport({ baseUrl, httpVersion: "1.1", interceptors });
  }
}

export interface ParleyClient {
  chats: Client<typeof ChatService>;
  members: Client<typeof MemberService>;
  messages: Client<typeof MessageService>;
  notifications: Client<typeof NotificationService>;
}

/** Connect-es clients for all four services, as one user. */
export function parleyClient(baseUrl: string, token: string, protocol: Protocol = "connect"): ParleyClient {
  const transport = connectTransport(baseUrl, token, protocol);
  return {
    chats: createClient(ChatService, transport),
    members: createClient(MemberService, transport),
    messages: createClient(MessageService, transport),
    notifications: createClient(NotificationService, transport),
  };
}

/** The independent client: @grpc/grpc-js with stubs loaded from the .proto files. */
export function grpcPackage() {
  const definition = protoLoader.loadSync(
    ["parley/v1/chat.proto", "parley/v1/member.proto", "parley/v1/message.proto", "parley/v1/notification.proto"],
    { includeDirs: [protoDir], longs: String, enums: String, defaults: true, arrays: true, oneofs: true },
  );
  return grpc.loadPackageDefinition(definition) as unknown as {
    parley: { v1: Record<string, grpc.ServiceClientConstructor> };
  };
}

export function grpcMetadata(token: string): grpc.Metadata {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${token}`);
  return metadata;
}

/** Calls a unary grpc-js method as a promise. */
export function grpcUnary<T = any>(client: grpc.Client, method: string, request: object, metadata: grpc.Metadata, options: grpc.CallOptions = {}): Promise<T> {
  return new Promise((resolve, reject) => {
    (client as any)[method](request, metadata, options, (error: grpc.ServiceError | null, response: T) =>
      error ? reject(error) : resolve(response),
    );
  });
}
