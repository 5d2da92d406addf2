//! The asynchronous job routes in the OpenAPI document: `/v1/jobs…` and the Workers AI
//! `queueRequest` mode of the run routes.

use serde_json::json;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, Parameter, ParameterBuilder, ParameterIn, PathsBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::{ContentBuilder, PathItem, RefOr, Required, Response};

use super::{json_body, json_response, reference, with_errors, with_security as secured};

/// A stored job as `GET /v1/jobs/{id}` answers it.
pub(super) fn job_schema() -> RefOr<Schema> {
    let integer = || ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0));
    let time = |what: &str| {
        ObjectBuilder::new()
            .schema_type(SchemaType::Array(vec![Type::Integer, Type::Null]))
            .description(Some(format!("{what}, milliseconds since the Unix epoch")))
    };
    let error = ObjectBuilder::new()
        .schema_type(SchemaType::Array(vec![Type::Object, Type::Null]))
        .property("code", ObjectBuilder::new().schema_type(Type::Integer))
        .property("message", ObjectBuilder::new().schema_type(Type::String));
    ObjectBuilder::new()
        .description(Some("A stored asynchronous job"))
        .property("id", ObjectBuilder::new().schema_type(Type::String))
        .required("id")
        .property(
            "status",
            ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["queued", "running", "done", "failed"])),
        )
        .required("status")
        .property(
            "position",
            ObjectBuilder::new()
                .schema_type(SchemaType::Array(vec![Type::Integer, Type::Null]))
                .minimum(Some(0))
                .description(Some("Queued jobs ahead of this one (queued jobs only)")),
        )
        .property("step", integer().description(Some("Denoising steps done")))
        .property("total", integer())
        .property("seed", ObjectBuilder::new().schema_type(Type::String).description(Some("The seed, in decimal")))
        .property("attempts", integer().description(Some("Times a server took it; above 1 after a server died")))
        .property("created_at", ObjectBuilder::new().schema_type(Type::Integer))
        .property("started_at", time("When the last attempt started"))
        .property("finished_at", time("When it finished"))
        .property("error", error)
        .build()
        .into()
}

/// `{"result": {"status", "request_id"}, "success": true, …}`: Workers AI's answer to a
/// queued request, and to a poll of one that has not finished.
pub(super) fn queued_schema() -> RefOr<Schema> {
    let result = ObjectBuilder::new()
        .property("status", ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["queued", "running"])))
        .required("status")
        .property("request_id", ObjectBuilder::new().schema_type(Type::String))
        .required("request_id");
    ObjectBuilder::new()
        .property("result", result)
        .required("result")
        .property("success", ObjectBuilder::new().schema_type(Type::Boolean).enum_values(Some([true])))
        .required("success")
        .build()
        .into()
}

/// `?queueRequest=true` on the run routes.
pub(super) fn queue_request_parameter() -> Parameter {
    ParameterBuilder::new()
        .name("queueRequest")
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .description(Some(
            "`true`: store the request as a job and answer its `request_id` at once; POST \
             `{\"request_id\"}` to the same route to poll (the PNG once done)",
        ))
        // a string enum rather than a boolean: what the server reads is the text
        .schema(Some(ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["true", "false"]))))
        .build()
}

/// `/v1/jobs` and `/v1/jobs/{id}[/image]`.
pub(super) fn add_paths(paths: PathsBuilder, auth: bool, png: &Response) -> PathsBuilder {
    let id = || {
        ParameterBuilder::new()
            .name("id")
            .parameter_in(ParameterIn::Path)
            .required(Required::True)
            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
    };
    let job = || json_response("The job", reference("Job"));
    let error = |description: &str| json_response(description, reference("ErrorEnvelope"));
    // the answers of the routes that read a stored job
    let reading = |operation: OperationBuilder| {
        let mut operation = operation
            .parameter(id())
            .response("400", error("An id that is not valid UTF-8 (code 5006)"))
            .response("404", error("No job with that id, or it expired (code 7003)"))
            .response("500", error("The job store failed (code 3030)"));
        if auth {
            operation = operation.response("401", error("Missing or unknown bearer token (code 10000)"));
        }
        secured(operation, auth).build()
    };
    let submit = secured(
        with_errors(
            OperationBuilder::new()
                .operation_id(Some("jobs_submit"))
                .summary(Some("Store a generation as a job; answers at once"))
                .request_body(Some(json_body(
                    "RunRequest",
                    json!({"prompt": "cyberpunk cat", "num_steps": 4, "guidance": 0, "seed": 42}),
                )))
                .response("202", job())
                .response("404", error("The server runs without a job store (code 7003)")),
            "ErrorEnvelope",
            auth,
        ),
        auth,
    )
    .build();
    let status = reading(OperationBuilder::new().operation_id(Some("jobs_get")).response("200", job()));
    let cancel = reading(
        OperationBuilder::new().operation_id(Some("jobs_delete")).summary(Some("Cancel and delete a job")).response(
            "200",
            json_response(
                "Gone: `cancelled` if it was queued or running, `deleted` if it had finished",
                ObjectBuilder::new()
                    .property("id", ObjectBuilder::new().schema_type(Type::String))
                    .required("id")
                    .property(
                        "status",
                        ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["cancelled", "deleted"])),
                    )
                    .required("status"),
            ),
        ),
    );
    let image = reading(
        OperationBuilder::new()
            .operation_id(Some("jobs_image"))
            .summary(Some("The PNG of a done job; a failed job's error"))
            .response("200", png.clone())
            .response("409", error("Not done yet (code 3041)"))
            .response("408", error("The job failed: it ran past its deadline (code 3007)"))
            .response("503", error("The job failed: its server shut down (code 3040)")),
    );
    let mut item = PathItem::new(HttpMethod::Get, status);
    item.delete = Some(cancel);
    paths
        .path("/v1/jobs", PathItem::new(HttpMethod::Post, submit))
        .path("/v1/jobs/{id}", item)
        .path("/v1/jobs/{id}/image", PathItem::new(HttpMethod::Get, image))
}

/// The run routes' 200: the PNG, or JSON for a queued request or an unfinished poll.
pub(super) fn run_answer(png: &Response) -> Response {
    let mut answer = png.clone();
    answer.description = "The generated image; with `queueRequest=true`, or polling an unfinished job, the \
                          job's status"
        .into();
    answer
        .content
        .insert("application/json".into(), ContentBuilder::new().schema(Some(reference("QueuedEnvelope"))).build());
    answer
}
