// A minimal offline renderer of /openapi.json: each route with its parameters, request body and responses.
"use strict";

function el(tag, cls, text) {
  const n = document.createElement(tag);
  if (cls) n.className = cls;
  if (text !== undefined) n.textContent = text;
  return n;
}

function schemaText(schema, spec) {
  if (!schema) return "";
  if (schema.$ref) {
    const name = schema.$ref.split("/").pop();
    const target = spec.components && spec.components.schemas && spec.components.schemas[name];
    return target ? `${name} ${JSON.stringify(target.properties ? Object.keys(target.properties) : target)}` : name;
  }
  return JSON.stringify(schema);
}

async function render() {
  const root = document.getElementById("api");
  let spec;
  try {
    spec = await (await fetch("/openapi.json")).json();
  } catch (e) {
    root.textContent = `Could not load /openapi.json (${e.message}).`;
    return;
  }
  document.getElementById("title").textContent = `${spec.info.title} ${spec.info.version} API`;
  root.append(el("p", "", spec.info.summary || ""), el("p", "notice", spec.info.description || ""));
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const sec = el("section", "card route");
      sec.dataset.testid = "route";
      sec.append(el("h2", "", `${method.toUpperCase()} ${path}`), el("p", "", op.summary || ""));
      if (op.description) sec.append(el("p", "muted", op.description));
      const params = op.parameters || [];
      if (params.length) {
        const ul = el("ul");
        for (const p of params) {
          const type = (p.schema && p.schema.type) || "";
          const dflt = p.schema && "default" in p.schema ? `, default ${JSON.stringify(p.schema.default)}` : "";
          ul.append(el("li", "", `${p.name} (${p.in}, ${type}${dflt}): ${p.description || ""}`));
        }
        sec.append(el("h3", "", "Parameters"), ul);
      }
      if (op.requestBody) {
        const types = Object.keys(op.requestBody.content || {});
        const ul = el("ul");
        for (const t of types) ul.append(el("li", "", `${t}: ${schemaText(op.requestBody.content[t].schema, spec)}`));
        sec.append(el("h3", "", "Request body"), ul);
      }
      const ul = el("ul");
      for (const [code, r] of Object.entries(op.responses || {})) ul.append(el("li", "", `${code}: ${r.description || ""}`));
      sec.append(el("h3", "", "Responses"), ul);
      root.append(sec);
    }
  }
}

document.addEventListener("DOMContentLoaded", render);
