/**
 * Compares two V8 heap snapshots by constructor (node type + name): count and self size added.
 * Usage: npx tsx bench/heap-diff.ts <before.heapsnapshot> <after.heapsnapshot> [per-N] [top]
 */
import fs from "node:fs";
import { fileURLToPath } from "node:url";

interface Snapshot {
  snapshot: { meta: { node_fields: string[]; node_types: (string[] | string)[] } };
  nodes: number[];
  strings: string[];
}

export function aggregate(file: string): Map<string, { count: number; size: number }> {
  const snap = JSON.parse(fs.readFileSync(file, "utf8")) as Snapshot;
  const fields = snap.snapshot.meta.node_fields;
  const types = snap.snapshot.meta.node_types[0] as string[];
  const width = fields.length;
  const typeAt = fields.indexOf("type");
  const nameAt = fields.indexOf("name");
  const sizeAt = fields.indexOf("self_size");
  const out = new Map<string, { count: number; size: number }>();
  for (let i = 0; i < snap.nodes.length; i += width) {
    const type = types[snap.nodes[i + typeAt]!] ?? "?";
    let name = snap.strings[snap.nodes[i + nameAt]!] ?? "?";
    if (type === "string" || type === "concatenated string" || type === "sliced string") name = "(string)";
    else if (type === "code") name = "(code)";
    else if (name.length > 60) name = `${name.slice(0, 57)}...`;
    const key = `${type}: ${name}`;
    const entry = out.get(key) ?? { count: 0, size: 0 };
    entry.count++;
    entry.size += snap.nodes[i + sizeAt]!;
    out.set(key, entry);
  }
  return out;
}

export interface HeapDiffRow {
  what: string;
  countPerUnit: number;
  bytesPerUnit: number;
}

export function heapDiff(before: string, after: string, units: number, top = 25): { totalBytesPerUnit: number; rows: HeapDiffRow[] } {
  const a = aggregate(before);
  const b = aggregate(after);
  const rows: HeapDiffRow[] = [];
  let total = 0;
  for (const [key, v] of b) {
    const old = a.get(key) ?? { count: 0, size: 0 };
    const size = v.size - old.size;
    total += size;
    rows.push({ what: key, countPerUnit: Math.round(((v.count - old.count) / units) * 100) / 100, bytesPerUnit: Math.round(size / units) });
  }
  for (const [key, v] of a) if (!b.has(key)) total -= v.size;
  rows.sort((x, y) => y.bytesPerUnit - x.bytesPerUnit);
  return { totalBytesPerUnit: Math.round(total / units), rows: rows.slice(0, top) };
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const [before, after, per = "1", top = "30"] = process.argv.slice(2);
  if (!before || !after) {
    console.error("usage: tsx bench/heap-diff.ts <before.heapsnapshot> <after.heapsnapshot> [per-N] [top]");
    process.exit(2);
  }
  const diff = heapDiff(before, after, Number(per), Number(top));
  console.log(`self size added per unit: ${diff.totalBytesPerUnit} bytes`);
  console.log("| bytes per unit | objects per unit | type: constructor |\n|---:|---:|---|");
  for (const r of diff.rows) console.log(`| ${r.bytesPerUnit} | ${r.countPerUnit} | ${r.what} |`);
}
