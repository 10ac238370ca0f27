/**
 * Subject naming, in one place. Tenants and chat ids are validated to [A-Za-z0-9_-] before they get
 * here; user ids are arbitrary strings, so they are always base64url-encoded (never spliced raw).
 */
export class Subjects {
  constructor(private readonly prefix: string) {}

  chat(tenant: string, chatId: string): string {
    return `${this.prefix}.${safeToken(tenant)}.chat.${safeToken(chatId)}`;
  }

  user(tenant: string, userId: string): string {
    return `${this.prefix}.${safeToken(tenant)}.user.${Buffer.from(userId, "utf8").toString("base64url")}`;
  }
}

function safeToken(token: string): string {
  if (!/^[A-Za-z0-9_-]+$/.test(token)) throw new Error(`unsafe subject token ${JSON.stringify(token)}`);
  return token;
}
