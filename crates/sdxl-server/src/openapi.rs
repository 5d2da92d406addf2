//! `GET /openapi.json`: generated from the wire types, with the defaults and limits in force
//! patched in (operators may change `num_steps` and `guidance` defaults), and every answer
//! each route can give: the PNG or JSON body, and the error envelopes with their statuses.
//! `load_tests/schema.sh` runs schemathesis against this document on a live server, so what
//! it says is checked against what the server does.

mod clients;
mod jobs;

use sdxl_engine::Limits;
use serde_json::{json, Value};
use utoipa::openapi::path::{HttpMethod, Operation, OperationBuilder, ParameterBuilder, ParameterIn, PathsBuilder};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{
    ArrayBuilder, ArrayItems, Object, ObjectBuilder, Schema, SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, HeaderBuilder, OpenApi as Document, PathItem, Ref, RefOr, Required, Response, ResponseBuilder,
};
use utoipa::{Number, OpenApi};

use crate::config::ServerConfig;
use crate::job_api::{Deleted, Job, JobFailure, QueuedEnvelope, QueuedResult};
use crate::routes::a1111::wire::{
    GenerationInfo, GenerationRequest, GenerationResponse, Lora, Progress, ProgressState, Sampler, Scheduler, SdModel,
    SdVae, Upscaler,
};
use crate::routes::openai::wire::{EditRequest, ImageData, ImagesRequest, ImagesResponse, Model, ModelList};
use crate::wire::RunRequest;

#[derive(OpenApi)]
#[openapi(
    info(title = "sdxl", description = "Workers AI-compatible SDXL-Lightning text-to-image server"),
    components(schemas(
        RunRequest,
        ImagesRequest,
        ImagesResponse,
        ImageData,
        EditRequest,
        Model,
        ModelList,
        GenerationRequest,
        GenerationResponse,
        GenerationInfo,
        SdModel,
        Sampler,
        Scheduler,
        Upscaler,
        SdVae,
        Lora,
        Progress,
        ProgressState,
        Job,
        JobFailure,
        Deleted,
        QueuedEnvelope,
        QueuedResult
    ))
)]
struct ApiDoc;

/// One side of `size` ("WxH"): a decimal number from 256 to 2048 without a sign, spaces or
/// leading zeros, which is exactly what `POST /v1/images/generations` accepts.
pub const SIZE_SIDE_PATTERN: &str = "(25[6-9]|2[6-9][0-9]|[3-9][0-9]{2}|1[0-9]{3}|20[0-3][0-9]|204[0-8])";

/// The name of the bearer-token security scheme (present when API keys are configured).
const BEARER: &str = "bearerAuth";

/// The OpenAPI document for this server's configuration.
pub fn document(config: &ServerConfig) -> Document {
    let mut doc = ApiDoc::openapi();
    let auth = config.api_keys.iter().any(|k| !k.is_empty());
    let components = doc.components.get_or_insert_with(Default::default);
    for name in ["RunRequest", "ImagesRequest", "EditRequest", "GenerationRequest"] {
        let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(name) else { continue };
        patch_request(object, name, config);
    }
    components.schemas.insert("ErrorEnvelope".into(), error_envelope());
    components.schemas.insert("OpenAiError".into(), openai_error());
    components.schemas.insert("A1111Error".into(), clients::a1111_error());
    if auth {
        components
            .security_schemes
            .insert(BEARER.into(), SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
    }
    doc.paths = paths(auth);
    doc
}

/// The defaults in force and the bounds the derive cannot express.
fn patch_request(object: &mut Object, name: &str, config: &ServerConfig) {
    let limits = Limits::SERVER;
    let mut with = |field: &str, patch: &dyn Fn(&mut Object)| {
        if let Some(RefOr::T(Schema::Object(property))) = object.properties.get_mut(field) {
            patch(property);
        }
    };
    with("num_steps", &|p| {
        p.default = Some(json!(config.default_steps));
        p.minimum = Some(Number::UInt(1));
        p.maximum = Some(Number::UInt(limits.max_steps));
    });
    with("guidance", &|p| {
        p.default = Some(json!(config.default_guidance));
        p.minimum = Some(Number::Float(0.0));
        p.maximum = Some(Number::Float(limits.max_guidance));
    });
    // AUTOMATIC1111's names and step bound
    with("steps", &|p| {
        p.default = Some(json!(config.default_steps));
        p.minimum = Some(Number::UInt(1));
        p.maximum = Some(Number::UInt(crate::routes::a1111::LIMITS.max_steps));
    });
    with("cfg_scale", &|p| {
        p.default = Some(json!(config.default_guidance));
        p.minimum = Some(Number::Float(0.0));
        p.maximum = Some(Number::Float(limits.max_guidance));
    });
    // u64: the derive says int64, whose upper half the server accepts too; AUTOMATIC1111's is
    // an i64 where -1 means random
    with("seed", &|p| {
        p.format = None;
        if name == "GenerationRequest" {
            p.minimum = Some(Number::Int(-1));
            p.maximum = Some(Number::Int(i64::MAX as isize));
        } else {
            p.minimum = Some(Number::UInt(0));
            p.maximum = Some(Number::UInt(u64::MAX as usize));
        }
    });
    with("prompt", &|p| {
        // AUTOMATIC1111 takes an empty prompt (an unconditional image)
        p.min_length = (name != "GenerationRequest").then_some(1);
        p.max_length = Some(sdxl_engine::request::MAX_PROMPT_CHARS);
    });
    with("negative_prompt", &|p| p.max_length = Some(sdxl_engine::request::MAX_PROMPT_CHARS));
    for side in ["width", "height"] {
        with(side, &|p| {
            p.minimum = Some(Number::UInt(limits.min_side));
            p.maximum = Some(Number::UInt(limits.max_side));
        });
    }
    if name == "ImagesRequest" || name == "EditRequest" {
        with("size", &|p| {
            p.pattern = Some(format!("^(auto|{SIZE_SIDE_PATTERN}x{SIZE_SIDE_PATTERN})$"));
            p.default = Some(json!("auto"));
        });
        with("response_format", &|p| {
            p.enum_values = Some(vec![json!("b64_json"), json!("url"), Value::Null]);
            p.default = Some(json!("b64_json"));
        });
        with("output_format", &|p| {
            p.enum_values = Some(vec![json!("png"), json!("jpeg"), json!("webp"), Value::Null]);
            p.default = Some(json!("png"));
        });
    }
    if object.properties.contains_key("sampler") {
        // not on the multipart edit: schemathesis cannot judge a `not` beside binary fields
        patch_sampling(object, name != "EditRequest");
    }
    // image bytes: integers 0-255 (the derive gives u8 no maximum)
    for field in ["image", "mask"] {
        if let Some(RefOr::T(Schema::Array(array))) = object.properties.get_mut(field) {
            array.items = ArrayItems::RefOrSchema(Box::new(
                ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)).maximum(Some(255)).build().into(),
            ));
        }
    }
}

/// The `sampler` and `schedule` names, and (a `not` keyword, which the derive lacks) the
/// pairs diffusers does not offer, so a schema-valid body is one the server accepts.
fn patch_sampling(object: &mut Object, refuse_pairs: bool) {
    use sdxl_engine::request::{Sampler, ScheduleKind};
    let names = |names: Vec<&str>| names.into_iter().map(|n| json!(n)).chain([Value::Null]).collect::<Vec<_>>();
    for (field, values) in [
        ("sampler", names(Sampler::ALL.iter().map(|s| s.name()).collect())),
        ("schedule", names(ScheduleKind::ALL.iter().map(|k| k.name()).collect())),
    ] {
        if let Some(RefOr::T(Schema::Object(property))) = object.properties.get_mut(field) {
            property.enum_values = Some(values);
        }
    }
    if !refuse_pairs {
        return;
    }
    let refused: Vec<Value> = Sampler::ALL
        .iter()
        .filter_map(|&sampler| {
            let kinds: Vec<&str> =
                ScheduleKind::ALL.iter().filter(|k| !sampler.supports(**k)).map(|k| k.name()).collect();
            (!kinds.is_empty()).then(|| {
                json!({
                    "properties": {"sampler": {"const": sampler.name()}, "schedule": {"enum": kinds}},
                    "required": ["sampler", "schedule"],
                })
            })
        })
        .collect();
    object.extensions.get_or_insert_with(Default::default).insert("not".into(), json!({"anyOf": refused}));
}

/// `{"result": null, "success": false, "errors": [{"code", "message"}], "messages": []}`.
fn error_envelope() -> RefOr<Schema> {
    let error = ObjectBuilder::new()
        .property("code", ObjectBuilder::new().schema_type(Type::Integer).description(Some("Workers AI error code")))
        .required("code")
        .property("message", ObjectBuilder::new().schema_type(Type::String))
        .required("message")
        .build();
    ObjectBuilder::new()
        .description(Some("The Workers AI error envelope"))
        .property("result", ObjectBuilder::new().schema_type(Type::Null))
        .required("result")
        .property("success", ObjectBuilder::new().schema_type(Type::Boolean).enum_values(Some([false])))
        .required("success")
        .property("errors", ArrayBuilder::new().items(error).min_items(Some(1)))
        .required("errors")
        .property(
            "messages",
            ArrayBuilder::new().items(ObjectBuilder::new().schema_type(SchemaType::AnyValue)).max_items(Some(0)),
        )
        .required("messages")
        .build()
        .into()
}

/// `{"error": {"message", "type", "code"}}`, the errors of `POST /v1/images/generations`.
fn openai_error() -> RefOr<Schema> {
    let error = ObjectBuilder::new()
        .property("message", ObjectBuilder::new().schema_type(Type::String))
        .required("message")
        .property(
            "type",
            ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["invalid_request_error", "server_error"])),
        )
        .required("type")
        .property("code", ObjectBuilder::new().schema_type(Type::Integer).description(Some("Workers AI error code")))
        .required("code")
        .build();
    ObjectBuilder::new()
        .description(Some("An error in OpenAI's shape"))
        .property("error", error)
        .required("error")
        .build()
        .into()
}

fn reference(name: &str) -> RefOr<Schema> {
    RefOr::Ref(Ref::from_schema_name(name))
}

fn json_response(description: &str, schema: impl Into<RefOr<Schema>>) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content("application/json", ContentBuilder::new().schema(Some(schema)).build())
        .build()
}

fn integer_header(description: &str) -> utoipa::openapi::header::Header {
    HeaderBuilder::new()
        .schema(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)))
        .description(Some(description))
        .build()
}

/// The failures a generation route can answer, each with `error_schema` as its body.
fn with_errors(mut operation: OperationBuilder, error_schema: &str, auth: bool) -> OperationBuilder {
    let error = |description: &str| json_response(description, reference(error_schema));
    let mut cases = vec![
        ("400", "Bad input: body not JSON or against the schema, bad image bytes, conflicting fields (code 5006); unknown model (5007)"),
        ("408", "The body did not arrive in time, or the request waited or ran past its deadline (code 3007)"),
        ("413", "The body is larger than the server's limit (code 3006)"),
        ("500", "Generation failed; the detail is in the server log only (code 3030)"),
        ("503", "The server is draining for shutdown (code 3040)"),
        ("403", "A browser request from an origin the server does not allow (code 10403)"),
        ("415", "A browser request whose body is not declared `application/json` (code 10415)"),
        ("421", "A `Host` this server does not answer for (code 10421)"),
    ];
    if auth {
        cases.push(("401", "Missing or unknown API key, as a bearer token or Basic password (code 10000)"));
    }
    for (status, description) in cases {
        operation = operation.response(status, error(description));
    }
    let mut queue_full = error(
        "The queue is full, or this key has its share of it waiting; retry after `Retry-After` seconds (code 3040)",
    );
    queue_full.headers.insert("Retry-After".into(), integer_header("Seconds to wait before retrying"));
    operation.response("429", queue_full)
}

/// `operation` behind the bearer token when the server has API keys.
fn with_security(operation: OperationBuilder, auth: bool) -> OperationBuilder {
    if auth {
        operation.security(SecurityRequirement::new(BEARER, Vec::<String>::new()))
    } else {
        operation
    }
}

fn json_body(schema: &str, example: Value) -> utoipa::openapi::request_body::RequestBody {
    RequestBodyBuilder::new()
        .content(
            "application/json",
            ContentBuilder::new().schema(Some(reference(schema))).example(Some(example)).build(),
        )
        .required(Some(Required::True))
        .build()
}

/// The routes, described by hand: their bodies are the component schemas above.
fn paths(auth: bool) -> utoipa::openapi::Paths {
    let secured = |operation: OperationBuilder| with_security(operation, auth);
    let png = {
        let mut png = ResponseBuilder::new()
            .description("The generated image")
            .content(
                "image/png",
                ContentBuilder::new()
                    .schema(Some(
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .format(Some(SchemaFormat::Custom("binary".into()))),
                    ))
                    .build(),
            )
            .build();
        png.headers.insert("x-seed".into(), integer_header("The seed used"));
        png.headers.insert("x-queue-time-ms".into(), integer_header("Milliseconds spent waiting in the queue"));
        png.headers.insert("x-inference-time-ms".into(), integer_header("Milliseconds spent generating"));
        png
    };
    let run = |operation_id: &str, account: bool| -> Operation {
        let mut operation = OperationBuilder::new()
            .operation_id(Some(operation_id))
            .summary(Some("Generate an image (Workers AI)"))
            .request_body(Some(json_body(
                "RunRequest",
                json!({"prompt": "cyberpunk cat", "num_steps": 4, "guidance": 0, "seed": 42}),
            )))
            .response("200", jobs::run_answer(&png))
            .response(
                "404",
                json_response("Polling an unknown or expired `request_id` (code 7003)", reference("ErrorEnvelope")),
            );
        if account {
            operation = operation.parameter(
                ParameterBuilder::new()
                    .name("account_id")
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .description(Some("Accepted and ignored"))
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
            );
        }
        let error = |description: &str| json_response(description, reference("ErrorEnvelope"));
        operation = operation
            .parameter(jobs::queue_request_parameter())
            .parameter(jobs::idempotency_key_parameter())
            .response("409", jobs::key_reused(&error));
        secured(with_errors(operation, "ErrorEnvelope", auth)).build()
    };
    let images = secured(with_errors(
        OperationBuilder::new()
            .operation_id(Some("images_generations"))
            .summary(Some("Generate images (OpenAI style)"))
            .request_body(Some(json_body(
                "ImagesRequest",
                json!({"prompt": "a lighthouse", "n": 2, "size": "768x512", "num_steps": 4, "guidance": 0}),
            )))
            .response("200", json_response("The images", reference("ImagesResponse"))),
        "OpenAiError",
        auth,
    ))
    .build();
    let events = ResponseBuilder::new()
        .description(
            "Server-Sent Events: `queued` {position} while waiting (jobs ahead; 0 = next), one `step` \
             {step, total, elapsed_ms, eta_ms, preview} per denoising step (preview: base64 PNG of the latents, \
             one pixel per 8×8 block, or null), then `image` {image (base64 PNG, the run route's bytes), seed \
             (decimal string), queue_time_ms, inference_time_ms} or `error` (the error envelope). Closing the \
             stream cancels the job.",
        )
        .content(
            "text/event-stream",
            // one event: its name and its data, a JSON text
            ContentBuilder::new()
                .schema(Some(
                    ObjectBuilder::new()
                        .property(
                            "event",
                            ObjectBuilder::new()
                                .schema_type(Type::String)
                                .enum_values(Some(["queued", "step", "image", "error"])),
                        )
                        .required("event")
                        .property("data", ObjectBuilder::new().schema_type(Type::String))
                        .required("data"),
                ))
                .build(),
        )
        .build();
    let stream = secured(with_errors(
        OperationBuilder::new()
            .operation_id(Some("run_stream"))
            .summary(Some("Generate an image, streaming progress and previews"))
            .request_body(Some(json_body(
                "RunRequest",
                json!({"prompt": "cyberpunk cat", "num_steps": 4, "guidance": 0, "seed": 42}),
            )))
            .response("200", events),
        "ErrorEnvelope",
        auth,
    ))
    .build();
    let status = |values: &[&str]| {
        ObjectBuilder::new()
            .property("status", ObjectBuilder::new().schema_type(Type::String).enum_values(Some(values.to_vec())))
            .required("status")
    };
    let get = |operation_id: &str, summary: &str, responses: Vec<(&str, Response)>| {
        let mut operation = OperationBuilder::new().operation_id(Some(operation_id)).summary(Some(summary));
        for (code, response) in responses {
            operation = operation.response(code, response);
        }
        PathItem::new(HttpMethod::Get, operation.build())
    };
    let count = || ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0));
    let ready = status(&["ready"])
        .property("queue_waiting", count())
        .required("queue_waiting")
        .property("busy", ObjectBuilder::new().schema_type(Type::Boolean))
        .required("busy");
    let text = ResponseBuilder::new()
        .description("Prometheus text exposition format")
        .content(
            "text/plain",
            ContentBuilder::new().schema(Some(ObjectBuilder::new().schema_type(Type::String))).build(),
        )
        .build();
    let openapi = json_response("This document", ObjectBuilder::new().schema_type(Type::Object));
    let html = ResponseBuilder::new()
        .description("The playground page")
        .content(
            "text/html",
            ContentBuilder::new().schema(Some(ObjectBuilder::new().schema_type(Type::String))).build(),
        )
        .build();
    let paths = PathsBuilder::new()
        .path(
            "/client/v4/accounts/{account_id}/ai/run/@cf/bytedance/stable-diffusion-xl-lightning",
            PathItem::new(HttpMethod::Post, run("run_account", true)),
        )
        .path("/ai/run/@cf/bytedance/stable-diffusion-xl-lightning", PathItem::new(HttpMethod::Post, run("run", false)))
        .path("/v1/images/generations", PathItem::new(HttpMethod::Post, images))
        .path("/v1/run/stream", PathItem::new(HttpMethod::Post, stream))
        .path(
            "/",
            get(
                "playground",
                "The playground page (no auth needed; its API calls carry the token)",
                vec![("200", html)],
            ),
        )
        .path("/health", get("health", "Liveness", vec![("200", json_response("Alive", status(&["ok"])))]))
        .path(
            "/ready",
            get(
                "ready",
                "Readiness",
                vec![
                    ("200", json_response("Accepting work", ready)),
                    (
                        "503",
                        json_response(
                            "Draining for shutdown, or the job store unreachable",
                            status(&["draining", "store_unreachable"]),
                        ),
                    ),
                ],
            ),
        )
        .path("/metrics", get("metrics", "Prometheus metrics", vec![("200", text)]))
        .path("/openapi.json", get("openapi", "This OpenAPI document", vec![("200", openapi)]));
    let paths = clients::add_a1111(clients::add_openai(paths, auth), auth);
    jobs::add_paths(paths, auth, &png).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_pattern_matches_the_server_limits() {
        // SIZE_SIDE_PATTERN spells these bounds out; change both together
        assert_eq!((Limits::SERVER.min_side, Limits::SERVER.max_side), (256, 2048));
    }

    #[test]
    fn auth_shows_in_the_document_only_when_keys_are_configured() {
        let open = serde_json::to_value(document(&ServerConfig::default())).unwrap();
        let run = &open["paths"]["/ai/run/@cf/bytedance/stable-diffusion-xl-lightning"]["post"];
        assert!(run["responses"]["401"].is_null(), "{run}");
        assert!(run["security"].is_null(), "{run}");
        let config = ServerConfig { api_keys: vec!["k".into()], ..ServerConfig::default() };
        let closed = serde_json::to_value(document(&config)).unwrap();
        let run = &closed["paths"]["/ai/run/@cf/bytedance/stable-diffusion-xl-lightning"]["post"];
        assert_eq!(
            run["responses"]["401"]["content"]["application/json"]["schema"]["$ref"],
            json!("#/components/schemas/ErrorEnvelope")
        );
        assert_eq!(run["security"], json!([{ BEARER: [] }]));
        assert_eq!(closed["components"]["securitySchemes"][BEARER]["scheme"], json!("bearer"));
    }

    #[test]
    fn schema_types_match_the_wire() {
        let doc = serde_json::to_value(document(&ServerConfig::default())).unwrap();
        let run = &doc["components"]["schemas"]["RunRequest"]["properties"];
        assert_eq!(run["seed"]["maximum"], json!(u64::MAX));
        assert!(run["seed"]["format"].is_null());
        assert_eq!(run["image"]["items"]["maximum"], json!(255));
        let images = &doc["components"]["schemas"]["ImagesRequest"]["properties"];
        assert_eq!(images["num_steps"]["minimum"], json!(1));
        assert_eq!(images["num_steps"]["maximum"], json!(20));
    }
}
