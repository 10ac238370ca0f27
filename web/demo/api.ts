import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";
import { ChatService } from "../../gen/parley/v1/chat_pb.js";
import { MemberService } from "../../gen/parley/v1/member_pb.js";
import { MessageService } from "../../gen/parley/v1/message_pb.js";
import { NotificationService } from "../../gen/parley/v1/notification_pb.js";

export interface Api {
  chats: Client<typeof ChatService>;
  members: Client<typeof MemberService>;
  messages: Client<typeof MessageService>;
  notifications: Client<typeof NotificationService>;
}

/** Connect-Web clients (Connect protocol, JSON) for the server that served this page. */
export function createApi(token: string, baseUrl = location.origin): Api {
  const auth: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
  const transport = createConnectTransport({ baseUrl, interceptors: [auth] });
  return {
    chats: createClient(ChatService, transport),
    members: createClient(MemberService, transport),
    messages: createClient(MessageService, transport),
    notifications: createClient(NotificationService, transport),
  };
}

/** "not_found: chat not found" */
export function errorText(error: unknown): string {
  const e = ConnectError.from(error);
  const code = Code[e.code].replace(/[A-Z]/g, (c, i: number) => (i === 0 ? c : `_${c}`)).toLowerCase();
  return `${code}: ${e.rawMessage}`;
}

export function isUnauthenticated(error: unknown): boolean {
  return ConnectError.from(error).code === Code.Unauthenticated;
}
