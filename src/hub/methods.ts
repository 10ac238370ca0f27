import { create, toJson } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { ChatSchema, MarkReadRequestSchema } from "../../gen/parley/v1/chat_pb.js";
import { MessageSchema, SendMessageRequestSchema } from "../../gen/parley/v1/message_pb.js";
import type { Caller } from "../auth/caller.js";
import type { ParleyServices } from "../connect.js";
import { InvalidArgumentError } from "../errors.js";
import { hubJsonOptions } from "./events.js";

export type HubServices = Pick<ParleyServices, "chats" | "messages" | "notifications">;

type HubMethod = (services: HubServices, caller: Caller, args: unknown[]) => Promise<unknown>;

const INT64_MAX = 2n ** 63n - 1n;

const MARK_READ = "markread";

/** Client → server methods, keyed by lower-case name: SignalR matches method names case-insensitively. */
const methods = new Map<string, HubMethod>([
  ["sendmessage", async (services, caller, args) => {
    arity("SendMessage(chatId, text, clientMessageId?)", args, 2, 3);
    const req = create(SendMessageRequestSchema, {
      chatId: string("chat_id", args[0]),
      text: string("text", args[1]),
      clientMessageId: args[2] === undefined || args[2] === null ? "" : string("client_message_id", args[2]),
    });
    const { message } = await services.messages.sendMessage(caller, req);
    return toJson(MessageSchema, message!, hubJsonOptions);
  }],
  [MARK_READ, async (services, caller, args) => {
    arity("MarkRead(chatId, sequence)", args, 2, 2);
    const req = create(MarkReadRequestSchema, { chatId: string("chat_id", args[0]), sequence: int64("sequence", args[1]) });
    const { chat } = await services.chats.markRead(caller, req);
    return toJson(ChatSchema, chat!, hubJsonOptions);
  }],
]);

export function isMarkRead(target: string): boolean {
  return target.toLowerCase() === MARK_READ;
}

/** Runs a hub method and returns its result as JSON; unknown targets fail with UNIMPLEMENTED. */
export function invokeMethod(services: HubServices, caller: Caller, target: string, args: unknown[]): Promise<unknown> {
  const method = methods.get(target.toLowerCase());
  if (!method) {
    const known = "SendMessage, MarkRead";
    return Promise.reject(new ConnectError(`unknown hub method '${target}' (methods: ${known})`, Code.Unimplemented));
  }
  return method(services, caller, args);
}

function arity(signature: string, args: unknown[], min: number, max: number): void {
  if (args.length < min || args.length > max) {
    throw InvalidArgumentError.field("arguments", `expected ${signature}, got ${args.length} argument(s)`);
  }
}

function string(field: string, value: unknown): string {
  if (typeof value !== "string") throw InvalidArgumentError.field(field, "must be a string");
  return value;
}

/** int64 arrives as a JSON number (safe integers only) or, as in proto3 JSON, a decimal string. */
function int64(field: string, value: unknown): bigint {
  let parsed: bigint | undefined;
  if (typeof value === "number" && Number.isSafeInteger(value)) parsed = BigInt(value);
  if (typeof value === "string" && /^-?\d{1,19}$/.test(value)) parsed = BigInt(value);
  if (parsed === undefined || parsed > INT64_MAX || parsed < -INT64_MAX - 1n) {
    throw InvalidArgumentError.field(field, "must be an integer (a number or a decimal string)");
  }
  return parsed;
}
