//! `GET /openapi.json`: generated from the wire types, with the defaults in force patched in
//! (operators may change `num_steps` and `guidance` defaults).

use utoipa::openapi::schema::Schema;
use utoipa::openapi::{OpenApi as Document, RefOr};
use utoipa::OpenApi;

use crate::config::ServerConfig;
use crate::routes::openai::{ImageData, ImagesRequest, ImagesResponse};
use crate::wire::RunRequest;

#[derive(OpenApi)]
#[openapi(
    info(title = "sdxl", description = "Workers AI-compatible SDXL-Lightning text-to-image server"),
    components(schemas(RunRequest, ImagesRequest, ImagesResponse, ImageData))
)]
struct ApiDoc;

/// The OpenAPI document for this server's configuration.
pub fn document(config: &ServerConfig) -> Document {
    let mut doc = ApiDoc::openapi();
    if let Some(components) = doc.components.as_mut() {
        for name in ["RunRequest", "ImagesRequest"] {
            if let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(name) {
                for (field, value) in [
                    ("num_steps", serde_json::json!(config.default_steps)),
                    ("guidance", serde_json::json!(config.default_guidance)),
                ] {
                    if let Some(RefOr::T(Schema::Object(property))) = object.properties.get_mut(field) {
                        property.default = Some(value);
                    }
                }
            }
        }
    }
    doc.paths = paths();
    doc
}

/// The routes, described by hand: their bodies are the component schemas above.
fn paths() -> utoipa::openapi::Paths {
    use utoipa::openapi::path::{HttpMethod, OperationBuilder, PathsBuilder};
    use utoipa::openapi::request_body::RequestBodyBuilder;
    use utoipa::openapi::{ContentBuilder, ResponseBuilder};
    let json_body = |schema: &str| {
        RequestBodyBuilder::new()
            .content(
                "application/json",
                ContentBuilder::new().schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(schema)))).build(),
            )
            .required(Some(utoipa::openapi::Required::True))
            .build()
    };
    let png = ResponseBuilder::new()
        .description("The generated image")
        .content("image/png", ContentBuilder::new().build())
        .build();
    let error = ResponseBuilder::new()
        .description("Error envelope: {result: null, success: false, errors: [{code, message}], messages: []}")
        .build();
    let run = || {
        OperationBuilder::new()
            .summary(Some("Generate an image (Workers AI)"))
            .request_body(Some(json_body("RunRequest")))
            .response("200", png.clone())
            .response("400", error.clone())
            .response("401", error.clone())
            .response("408", error.clone())
            .response("413", error.clone())
            .response("429", error.clone())
            .response("500", error.clone())
            .build()
    };
    let images = OperationBuilder::new()
        .summary(Some("Generate images (OpenAI style)"))
        .request_body(Some(json_body("ImagesRequest")))
        .response(
            "200",
            ResponseBuilder::new()
                .description("The images")
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name("ImagesResponse"))))
                        .build(),
                )
                .build(),
        )
        .build();
    let simple = |summary: &str| {
        OperationBuilder::new()
            .summary(Some(summary))
            .response("200", ResponseBuilder::new().description("OK").build())
            .build()
    };
    PathsBuilder::new()
        .path(
            "/client/v4/accounts/{account_id}/ai/run/@cf/bytedance/stable-diffusion-xl-lightning",
            utoipa::openapi::PathItem::new(HttpMethod::Post, run()),
        )
        .path(
            "/ai/run/@cf/bytedance/stable-diffusion-xl-lightning",
            utoipa::openapi::PathItem::new(HttpMethod::Post, run()),
        )
        .path("/v1/images/generations", utoipa::openapi::PathItem::new(HttpMethod::Post, images))
        .path("/health", utoipa::openapi::PathItem::new(HttpMethod::Get, simple("Liveness")))
        .path("/ready", utoipa::openapi::PathItem::new(HttpMethod::Get, simple("Readiness")))
        .path("/metrics", utoipa::openapi::PathItem::new(HttpMethod::Get, simple("Prometheus metrics")))
        .build()
}
