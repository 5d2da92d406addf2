//! Where each tensor a model asks for (by its diffusers name) is stored in a checkpoint of
//! another layout (the original single-file layout, see [`crate::sgm`]).

/// Where a parameter the model asks for (by its diffusers name) is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Under this key, in the requested shape (or with extra trailing 1×1 dimensions, as the
    /// original VAE's attention stores its linear layers as 1×1 convolutions).
    Key(String),
    /// Part `index` of `parts` equal row blocks of a fused tensor (OpenCLIP's `in_proj`).
    Rows { key: String, index: usize, parts: usize },
    /// The transpose of the stored matrix (OpenCLIP's `text_projection`).
    Transposed(String),
}

/// Translates the names a model asks for into where a checkpoint stores them.
pub struct KeyMap(Box<dyn Fn(&str) -> Stored + Send + Sync>);

impl KeyMap {
    /// Names are stored as asked (diffusers-layout files).
    pub fn identity() -> Self {
        Self(Box::new(|name| Stored::Key(name.to_string())))
    }

    pub fn new(locate: impl Fn(&str) -> Stored + Send + Sync + 'static) -> Self {
        Self(Box::new(locate))
    }

    pub fn locate(&self, name: &str) -> Stored {
        (self.0)(name)
    }
}
