//! The routes of the other APIs clients speak, in the OpenAPI document: OpenAI's edits,
//! models and image links, and AUTOMATIC1111's `/sdapi/v1/*`.

use serde_json::json;
use utoipa::openapi::path::{HttpMethod, Operation, OperationBuilder, ParameterBuilder, ParameterIn, PathsBuilder};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, SchemaFormat, SchemaType, Type};
use utoipa::openapi::{ContentBuilder, PathItem, RefOr, Required, ResponseBuilder};

use super::{json_body, json_response, reference, with_errors, with_security};

/// `{"error", "detail", "body", "errors"}`: AUTOMATIC1111's error body.
pub(super) fn a1111_error() -> RefOr<Schema> {
    ObjectBuilder::new()
        .description(Some("An error in AUTOMATIC1111's shape (`detail`: FastAPI's list for a validation error)"))
        .property("error", ObjectBuilder::new().schema_type(Type::String))
        .required("error")
        .property("detail", ObjectBuilder::new().schema_type(SchemaType::AnyValue))
        .required("detail")
        .property("body", ObjectBuilder::new().schema_type(Type::String))
        .property("errors", ObjectBuilder::new().schema_type(Type::String))
        .build()
        .into()
}

fn path_parameter(name: &str) -> ParameterBuilder {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
}

fn binary() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String).format(Some(SchemaFormat::Custom("binary".into())))
}

/// OpenAI's `/v1/images/edits`, `/v1/models[/{id}]` and `/v1/images/files/{name}`.
pub(super) fn add_openai(paths: PathsBuilder, auth: bool) -> PathsBuilder {
    let edits = with_security(
        with_errors(
            OperationBuilder::new()
                .operation_id(Some("images_edits"))
                .summary(Some("Edit an image: img2img, or inpainting where the mask is transparent (OpenAI style)"))
                .request_body(Some(
                    RequestBodyBuilder::new()
                        .content(
                            "multipart/form-data",
                            ContentBuilder::new().schema(Some(reference("EditRequest"))).build(),
                        )
                        .required(Some(Required::True))
                        .build(),
                ))
                .response("200", json_response("The images", reference("ImagesResponse"))),
            "OpenAiError",
            auth,
        ),
        auth,
    )
    .build();
    let openai_error = |description: &str| json_response(description, reference("OpenAiError"));
    let mut models = OperationBuilder::new()
        .operation_id(Some("models_list"))
        .summary(Some("The model this server runs (OpenAI style)"))
        .response("200", json_response("The models", reference("ModelList")));
    let mut model = OperationBuilder::new()
        .operation_id(Some("models_get"))
        .parameter(path_parameter("id"))
        .response("200", json_response("The model", reference("Model")))
        .response("404", openai_error("Not this server's model (code 7003)"));
    if auth {
        let unauthorized = openai_error("Missing or unknown API key (code 10000)");
        models = models.response("401", unauthorized.clone());
        model = model.response("401", unauthorized);
    }
    let image_file = ResponseBuilder::new()
        .description("The image")
        .content("image/png", ContentBuilder::new().schema(Some(binary())).build())
        .content("image/jpeg", ContentBuilder::new().schema(Some(binary())).build())
        .content("image/webp", ContentBuilder::new().schema(Some(binary())).build())
        .build();
    let file = OperationBuilder::new()
        .operation_id(Some("images_file"))
        .summary(Some("An image answered with `response_format: \"url\"`; the link is the credential"))
        .parameter(path_parameter("name"))
        .response("200", image_file)
        .response("404", openai_error("No such image, or it expired (code 7003)"))
        .response("500", openai_error("The job store failed (code 3030)"))
        .build();
    paths
        .path("/v1/images/edits", PathItem::new(HttpMethod::Post, edits))
        .path("/v1/models", PathItem::new(HttpMethod::Get, with_security(models, auth).build()))
        .path("/v1/models/{id}", PathItem::new(HttpMethod::Get, with_security(model, auth).build()))
        .path("/v1/images/files/{name}", PathItem::new(HttpMethod::Get, file))
}

/// AUTOMATIC1111's routes: validation errors are 422, the rest as on the other routes.
pub(super) fn add_a1111(paths: PathsBuilder, auth: bool) -> PathsBuilder {
    let error = |description: &str| json_response(description, reference("A1111Error"));
    let secured = |mut operation: OperationBuilder| {
        if auth {
            operation = operation.response("401", error("Missing or unknown key, as a Basic password or bearer token"));
        }
        with_security(operation, auth).build()
    };
    let generate = |operation_id: &str, summary: &str, example: serde_json::Value| -> Operation {
        let mut operation = with_security(
            with_errors(
                OperationBuilder::new()
                    .operation_id(Some(operation_id))
                    .summary(Some(summary))
                    .request_body(Some(json_body("GenerationRequest", example)))
                    .response("200", json_response("The images", reference("GenerationResponse"))),
                "A1111Error",
                auth,
            ),
            auth,
        )
        .build();
        // AUTOMATIC1111 (FastAPI) answers a request that fails validation with 422
        if let Some(bad) = operation.responses.responses.remove("400") {
            operation.responses.responses.insert("422".into(), bad);
        }
        operation
    };
    let txt2img = generate(
        "sdapi_txt2img",
        "Generate images (AUTOMATIC1111)",
        json!({"prompt": "a red fox", "steps": 4, "cfg_scale": 0, "width": 1024, "height": 1024, "seed": 42}),
    );
    let img2img = generate(
        "sdapi_img2img",
        "Transform an image, or inpaint where the mask is white (AUTOMATIC1111)",
        json!({"prompt": "a wave", "init_images": ["iVBORw0KGgo…"], "denoising_strength": 0.5}),
    );
    let list = |operation_id: &str, summary: &str, item: &str| {
        let items = ArrayBuilder::new().items(reference(item));
        let operation = OperationBuilder::new()
            .operation_id(Some(operation_id))
            .summary(Some(summary))
            .response("200", json_response("The list", items));
        PathItem::new(HttpMethod::Get, secured(operation))
    };
    let any = || ObjectBuilder::new().schema_type(SchemaType::AnyValue);
    let object = || ObjectBuilder::new().schema_type(Type::Object);
    let get_options = secured(
        OperationBuilder::new()
            .operation_id(Some("sdapi_options_get"))
            .summary(Some("The options clients read: `sd_model_checkpoint` is the loaded model"))
            .response("200", json_response("The options", object())),
    );
    let set_options = secured(
        OperationBuilder::new()
            .operation_id(Some("sdapi_options_set"))
            .summary(Some("Accepts any options; `sd_model_checkpoint` must name the loaded model"))
            .request_body(Some(
                RequestBodyBuilder::new()
                    .content("application/json", ContentBuilder::new().schema(Some(object())).build())
                    .required(Some(Required::True))
                    .build(),
            ))
            .response("200", json_response("Done (`null`)", ObjectBuilder::new().schema_type(Type::Null)))
            .response("422", error("Not a JSON object, or another model named"))
            .response("408", error("The body did not arrive in time"))
            .response("413", error("The body is larger than the server's limit")),
    );
    let mut options = PathItem::new(HttpMethod::Get, get_options);
    options.post = Some(set_options);
    let plain = |method: HttpMethod, operation_id: &str, summary: &str, schema: ObjectBuilder| {
        let operation = OperationBuilder::new()
            .operation_id(Some(operation_id))
            .summary(Some(summary))
            .response("200", json_response("Done", schema));
        PathItem::new(method, secured(operation))
    };
    paths
        .path("/sdapi/v1/txt2img", PathItem::new(HttpMethod::Post, txt2img))
        .path("/sdapi/v1/img2img", PathItem::new(HttpMethod::Post, img2img))
        .path("/sdapi/v1/options", options)
        .path("/sdapi/v1/sd-models", list("sdapi_sd_models", "The loaded model", "SdModel"))
        .path("/sdapi/v1/samplers", list("sdapi_samplers", "The samplers; the one used first", "Sampler"))
        .path("/sdapi/v1/schedulers", list("sdapi_schedulers", "The schedules; the model's own first", "Scheduler"))
        .path("/sdapi/v1/upscalers", list("sdapi_upscalers", "Only \"None\": there is no hires pass", "Upscaler"))
        .path(
            "/sdapi/v1/latent-upscale-modes",
            plain(HttpMethod::Get, "sdapi_latent_upscale_modes", "None", ObjectBuilder::new().schema_type(Type::Array)),
        )
        .path("/sdapi/v1/sd-vae", list("sdapi_sd_vae", "The --vae file, if any", "SdVae"))
        .path("/sdapi/v1/sd-modules", list("sdapi_sd_modules", "Forge's name for sd-vae", "SdVae"))
        .path("/sdapi/v1/loras", list("sdapi_loras", "The LoRAs fused in at start-up", "Lora"))
        .path("/sdapi/v1/scripts", plain(HttpMethod::Get, "sdapi_scripts", "None", object()))
        .path(
            "/sdapi/v1/refresh-checkpoints",
            plain(HttpMethod::Post, "sdapi_refresh_checkpoints", "Nothing to rescan", any()),
        )
        .path("/sdapi/v1/progress", {
            let operation = OperationBuilder::new()
                .operation_id(Some("sdapi_progress"))
                .summary(Some("The caller's running txt2img/img2img request"))
                .response("200", json_response("Where it stands", reference("Progress")));
            PathItem::new(HttpMethod::Get, secured(operation))
        })
        .path(
            "/sdapi/v1/interrupt",
            plain(HttpMethod::Post, "sdapi_interrupt", "Stop the caller's running requests", object()),
        )
}
