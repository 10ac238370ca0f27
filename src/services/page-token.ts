import crypto from "node:crypto";
import { InvalidArgumentError } from "../errors.js";

const FIELD = "page_token";

/**
 * Opaque, signed page tokens. The MAC covers the tenant and the request's binding (chat, order,
 * filters), so a token only works for the exact listing that issued it.
 */
export class PageTokens {
  constructor(private readonly key: Buffer) {}

  encode(tenant: string, binding: readonly unknown[], position: readonly (string | bigint | number)[]): string {
    const payload = Buffer.from(JSON.stringify(position.map(String))).toString("base64url");
    return `${payload}.${this.mac(tenant, binding, payload)}`;
  }

  /** The position stored in a token, or undefined for an empty token. */
  decode(tenant: string, binding: readonly unknown[], token: string): string[] | undefined {
    if (token === "") return undefined;
    const [payload, mac, extra] = token.split(".");
    if (payload === undefined || mac === undefined || extra !== undefined || token.length > 1024) throw invalid();
    const expected = Buffer.from(this.mac(tenant, binding, payload));
    const given = Buffer.from(mac);
    if (given.length !== expected.length || !crypto.timingSafeEqual(given, expected)) throw invalid();
    let position: unknown;
    try {
      position = JSON.parse(Buffer.from(payload, "base64url").toString("utf8"));
    } catch {
      throw invalid();
    }
    if (!Array.isArray(position) || !position.every((p) => typeof p === "string")) throw invalid();
    return position as string[];
  }

  private mac(tenant: string, binding: readonly unknown[], payload: string): string {
    const bound = JSON.stringify([tenant, ...binding], (_key, value) => (typeof value === "bigint" ? value.toString() : value));
    return crypto.createHmac("sha256", this.key).update(bound).update("\0").update(payload).digest("base64url");
  }
}

function invalid(): InvalidArgumentError {
  return InvalidArgumentError.field(FIELD, "is invalid or belongs to a different request (chat and order and filters must not change)");
}
