// Parses every valid conformance file with the Kaitai-generated parser and checks that it
// agrees, field for field, with the expected description (which the C++ reader and the
// Python reader also produce), and that each tensor's data instance has its byte length.
const fs = require("fs");
const path = require("path");
const assert = require("assert");
const KaitaiStream = require("kaitai-struct/KaitaiStream");
const Tensormap = require("./generated/Tensormap.js");

const Parser = Tensormap.Tensormap || Tensormap;
const hexLE = (bytes) => Buffer.from(bytes).reverse().toString("hex");

function describe(buffer) {
  const f = new Parser(new KaitaiStream(buffer));
  const metadata = {};
  for (const m of f.metadata) metadata[m.key] = m.value;
  return {
    described: {
      format: "tensormap",
      version: `${f.major}.${f.minor}`,
      alignment: f.alignment,
      header_size: f.headerSize,
      file_size: buffer.length,
      metadata,
      tensors: f.tensors.map((t, i) => {
        const out = {
          name: t.name,
          dtype: Parser.Dtype[t.dtype].toUpperCase(),
          shape: t.shape,
          offset: t.offset,
          byte_length: t.byteLength,
          checksum: hexLE(t.checksum),
        };
        // An alias names the earlier record, itself no alias, whose bytes start at its offset.
        if (t.isAlias) {
          const target = f.tensors.slice(0, i).find((u) => !u.isAlias && u.byteLength > 0 && u.offset === t.offset);
          out.alias_of = target ? target.name : null;
        }
        return out;
      }),
    },
    dataLengths: f.tensors.map((t) => [t.data.length, t.byteLength]),
  };
}

const valid = path.join(__dirname, "..", "valid");
let passed = 0;
let failed = 0;
for (const name of fs.readdirSync(valid).filter((n) => n.endsWith(".tmap")).sort()) {
  try {
    const buffer = fs.readFileSync(path.join(valid, name));
    const expected = JSON.parse(fs.readFileSync(path.join(valid, name.replace(/\.tmap$/, ".json")), "utf8"));
    const { described, dataLengths } = describe(buffer);
    assert.deepStrictEqual(described, expected);
    for (const [got, want] of dataLengths) assert.strictEqual(got, want);
    passed++;
  } catch (e) {
    failed++;
    console.log(`FAIL valid/${name}: ${e.message.split("\n").slice(0, 6).join(" | ")}`);
  }
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
