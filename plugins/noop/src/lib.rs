//! A plugin that does nothing: the pre stage hands the model no tensors, the post stage returns
//! the model's outputs unchanged. What a call costs here is what the node's plugin machinery
//! costs, which `meshserve-bench plugins` reports as its baseline.

use meshserve_guest::{
    Answer, Context, Error, Plugin, Postprocess, Pre, Preprocess, Request, Tensor,
};

/// The plugin.
pub struct Noop;

impl Plugin for Noop {
    fn init(_config: &str) -> Result<Self, Error> {
        Ok(Noop)
    }
}

impl Preprocess for Noop {
    fn preprocess(&mut self, _request: &Request) -> Result<Pre, Error> {
        Ok(Pre::Infer(Vec::new()))
    }
}

impl Postprocess for Noop {
    fn postprocess(&mut self, _context: &Context, outputs: Vec<Tensor>) -> Result<Answer, Error> {
        Ok(Answer::Tensors(outputs))
    }
}

meshserve_guest::export_plugin!(Noop: pre, post);
