/**
 * Summarises a V8 .cpuprofile (from `node --cpu-prof`): self time by function and by module/package.
 * Usage: npx tsx bench/profile.ts <file.cpuprofile> [top]
 */
import fs from "node:fs";
import { fileURLToPath } from "node:url";

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
  children?: number[];
}
interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples?: number[];
  timeDeltas?: number[];
}

export interface ProfileSummary {
  file: string;
  totalMs: number;
  /** Share of samples that were not idle. */
  busyPercent: number;
  byFunction: { name: string; where: string; selfMs: number; selfPercentOfBusy: number }[];
  byModule: { module: string; selfMs: number; selfPercentOfBusy: number }[];
  /** Inclusive time of Parley's own source functions (src/...). */
  parleyInclusive: { name: string; where: string; totalMs: number; percentOfBusy: number }[];
}

function moduleOf(url: string, name: string): string {
  if (!url) return name.startsWith("(") ? name : "(native/V8)";
  const nm = url.lastIndexOf("node_modules/");
  if (nm >= 0) {
    const rest = url.slice(nm + "node_modules/".length).split("/");
    return rest[0]!.startsWith("@") ? `${rest[0]}/${rest[1]}` : rest[0]!;
  }
  if (url.startsWith("node:")) return url.split("/").slice(0, 2).join("/");
  const src = url.indexOf("/src/");
  if (src >= 0 && !url.includes("node_modules")) return `parley ${url.slice(src + 1)}`;
  const gen = url.indexOf("/gen/");
  if (gen >= 0) return "parley gen/";
  return url;
}

export function summarise(file: string, top = 25): ProfileSummary {
  const profile = JSON.parse(fs.readFileSync(file, "utf8")) as CpuProfile;
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  // Self time per node from the sample stream (timeDeltas in µs), falling back to hit counts.
  const selfUs = new Map<number, number>();
  if (profile.samples && profile.timeDeltas) {
    for (let i = 0; i < profile.samples.length; i++) {
      const delta = profile.timeDeltas[i + 1] ?? 0;
      selfUs.set(profile.samples[i]!, (selfUs.get(profile.samples[i]!) ?? 0) + delta);
    }
  } else {
    const interval = (profile.endTime - profile.startTime) / Math.max(1, profile.nodes.reduce((a, n) => a + (n.hitCount ?? 0), 0));
    for (const n of profile.nodes) selfUs.set(n.id, (n.hitCount ?? 0) * interval);
  }
  const totalUs = profile.endTime - profile.startTime;
  let idleUs = 0;
  const fn = new Map<string, { name: string; where: string; us: number }>();
  const mod = new Map<string, number>();
  for (const node of profile.nodes) {
    const us = selfUs.get(node.id) ?? 0;
    const { functionName, url, lineNumber } = node.callFrame;
    if (functionName === "(idle)") {
      idleUs += us;
      continue;
    }
    const name = functionName || "(anonymous)";
    const where = url ? `${url.replace(/^file:\/\/.*?\/(node_modules|src|gen)\//, "$1/")}:${lineNumber + 1}` : "";
    const key = `${name}@${where}`;
    const entry = fn.get(key) ?? { name, where, us: 0 };
    entry.us += us;
    fn.set(key, entry);
    const m = moduleOf(url, name);
    mod.set(m, (mod.get(m) ?? 0) + us);
  }
  const busyUs = Math.max(1, totalUs - idleUs);

  // Inclusive time of src/ functions: walk the tree, counting each sample once per distinct frame on its stack.
  const parent = new Map<number, number>();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const inclusive = new Map<string, { name: string; where: string; us: number }>();
  for (const [id, us] of selfUs) {
    if (us === 0 || byId.get(id)?.callFrame.functionName === "(idle)") continue;
    const seen = new Set<string>();
    for (let cur: number | undefined = id; cur !== undefined; cur = parent.get(cur)) {
      const cf = byId.get(cur)!.callFrame;
      if (!cf.url.includes("/src/") || cf.url.includes("node_modules")) continue;
      const where = `${cf.url.slice(cf.url.indexOf("/src/") + 1)}:${cf.lineNumber + 1}`;
      const key = `${cf.functionName}@${where}`;
      if (seen.has(key)) continue;
      seen.add(key);
      const entry = inclusive.get(key) ?? { name: cf.functionName || "(anonymous)", where, us: 0 };
      entry.us += us;
      inclusive.set(key, entry);
    }
  }

  const pct = (us: number) => Math.round((us / busyUs) * 1000) / 10;
  const ms = (us: number) => Math.round(us / 100) / 10;
  return {
    file,
    totalMs: ms(totalUs),
    busyPercent: Math.round(((totalUs - idleUs) / Math.max(1, totalUs)) * 1000) / 10,
    byFunction: [...fn.values()].sort((a, b) => b.us - a.us).slice(0, top)
      .map((e) => ({ name: e.name, where: e.where, selfMs: ms(e.us), selfPercentOfBusy: pct(e.us) })),
    byModule: [...mod.entries()].sort((a, b) => b[1] - a[1]).slice(0, top)
      .map(([module, us]) => ({ module, selfMs: ms(us), selfPercentOfBusy: pct(us) })),
    parleyInclusive: [...inclusive.values()].sort((a, b) => b.us - a.us).slice(0, top)
      .map((e) => ({ name: e.name, where: e.where, totalMs: ms(e.us), percentOfBusy: pct(e.us) })),
  };
}

export function profileMarkdown(summary: ProfileSummary, top = 15): string {
  const lines = [`Profile \`${summary.file}\`: ${summary.totalMs} ms recorded, ${summary.busyPercent}% busy (not idle).`, ""];
  lines.push("| self % of busy | module / package |", "|---:|---|");
  for (const m of summary.byModule.slice(0, top)) lines.push(`| ${m.selfPercentOfBusy} | ${m.module} |`);
  lines.push("", "| self % of busy | function | where |", "|---:|---|---|");
  for (const f of summary.byFunction.slice(0, top)) lines.push(`| ${f.selfPercentOfBusy} | ${f.name} | ${f.where} |`);
  lines.push("", "| inclusive % of busy | Parley function | where |", "|---:|---|---|");
  for (const f of summary.parleyInclusive.slice(0, top)) lines.push(`| ${f.percentOfBusy} | ${f.name} | ${f.where} |`);
  return lines.join("\n");
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const file = process.argv[2];
  if (!file) {
    console.error("usage: tsx bench/profile.ts <file.cpuprofile> [top]");
    process.exit(2);
  }
  console.log(profileMarkdown(summarise(file, Number(process.argv[3] ?? 25)), Number(process.argv[3] ?? 25)));
}
