// Compiles spec/tensormap.ksy with the Kaitai Struct compiler into generated/Tensormap.js.
const fs = require("fs");
const path = require("path");
const yaml = require("js-yaml");
const compiler = require("kaitai-struct-compiler");

const ksy = path.join(__dirname, "..", "..", "spec", "tensormap.ksy");
const out = path.join(__dirname, "generated");

compiler
  .compile("javascript", yaml.load(fs.readFileSync(ksy, "utf8")), null, false)
  .then((files) => {
    fs.mkdirSync(out, { recursive: true });
    for (const [name, code] of Object.entries(files)) {
      fs.writeFileSync(path.join(out, name), code);
      console.log(`compiled ${path.relative(process.cwd(), ksy)} -> ${path.join("generated", name)}`);
    }
  })
  .catch((e) => {
    console.error(`kaitai-struct-compiler failed: ${e}`);
    process.exit(1);
  });
