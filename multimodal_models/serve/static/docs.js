// Renders the server's OpenAPI schema (/openapi.json) without any external resources.
"use strict";

const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
};

function resolve(schema, spec, depth = 0) {
  // inline $refs (a few levels deep) so each request/response shows its fields
  if (!schema || typeof schema !== "object" || depth > 6) return schema;
  if (schema.$ref) {
    const name = schema.$ref.split("/").pop();
    return resolve((spec.components.schemas || {})[name] || {}, spec, depth + 1);
  }
  if (Array.isArray(schema)) return schema.map((s) => resolve(s, spec, depth + 1));
  const out = {};
  for (const [k, v] of Object.entries(schema)) out[k] = k === "$defs" ? undefined : resolve(v, spec, depth + 1);
  return out;
}

function typeOf(schema) {
  if (!schema) return "";
  if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
  if (schema.anyOf || schema.oneOf) return (schema.anyOf || schema.oneOf).map(typeOf).join(" | ");
  if (schema.type === "array") return `array of ${typeOf(schema.items)}`;
  if (schema.const !== undefined) return JSON.stringify(schema.const);
  return schema.type || (schema.properties ? "object" : "any");
}

// A table of the top-level fields, then the whole schema (folded).
function schemaBlock(schema, spec) {
  const full = resolve(schema, spec) || {};
  const box = el("div");
  if (full.properties) {
    const required = new Set(full.required || []);
    const table = el("table", {}, el("tr", {}, el("th", {}, "field"), el("th", {}, "type"), el("th", {}, "about")));
    for (const [name, field] of Object.entries(full.properties)) {
      const about = [field.description || "", field.default !== undefined ? `default ${JSON.stringify(field.default)}` : "",
                     required.has(name) ? "required" : ""].filter(Boolean).join("; ");
      table.append(el("tr", {}, el("td", {}, el("code", {}, name)), el("td", {}, typeOf(field)), el("td", {}, about)));
    }
    box.append(table);
  }
  box.append(el("details", {}, el("summary", {}, "JSON schema"), el("pre", {}, JSON.stringify(full, null, 2))));
  return box;
}

function operation(path, method, op, spec) {
  const summary = el("summary", {}, el("span", { class: `method ${method}` }, method.toUpperCase()),
                     el("span", { class: "path" }, path), el("span", { class: "muted" }, op.summary || ""));
  const body = el("div", { class: "body" });
  if (op.description) body.append(el("p", {}, op.description));
  const content = op.requestBody && op.requestBody.content;
  if (content) {
    for (const [type, media] of Object.entries(content)) {
      body.append(el("h4", {}, `Request body (${type})`), schemaBlock(media.schema, spec));
    }
  }
  const table = el("table", {}, el("tr", {}, el("th", {}, "status"), el("th", {}, "meaning")));
  for (const [status, response] of Object.entries(op.responses || {})) {
    table.append(el("tr", {}, el("td", {}, status), el("td", {}, response.description || "")));
  }
  body.append(el("h4", {}, "Responses"), table);
  const ok = (op.responses || {})["200"];
  const json = ok && ok.content && ok.content["application/json"];
  if (json) body.append(el("h4", {}, "200 response (application/json)"), schemaBlock(json.schema, spec));
  return el("details", { class: "op", id: `${method}-${path}` }, summary, body);
}

fetch("/openapi.json")
  .then((r) => r.json())
  .then((spec) => {
    document.getElementById("title").textContent = `${spec.info.title} ${spec.info.version}`;
    document.getElementById("description").append(el("p", {}, spec.info.description || ""));
    const list = document.getElementById("operations");
    for (const [path, item] of Object.entries(spec.paths)) {
      for (const [method, op] of Object.entries(item)) list.append(operation(path, method, op, spec));
    }
  })
  .catch((err) => {
    const box = document.getElementById("error");
    box.textContent = `cannot load /openapi.json: ${err.message}`;
    box.classList.remove("hidden");
  });
