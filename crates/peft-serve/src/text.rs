//! The text of one choice as its tokens arrive: decoded incrementally, cut at the first stop
//! string (which the answer does not include, as OpenAI's API), and released for streaming only
//! when it can no longer change: complete characters, and nothing that could still turn out to
//! begin a stop string. So the streamed pieces add up to exactly the non-streamed text.

use peft::io::tokenizer::Tokenizer;

pub struct TextState {
    tokens: Vec<u32>,
    stops: Vec<String>,
    /// Bytes of the text already released.
    sent: usize,
    /// The text so far, cut at a stop string once one appeared.
    text: String,
    /// A stop string appeared: the choice is over.
    pub stopped: bool,
    eos: Vec<u32>,
}

impl TextState {
    pub fn new(stops: Vec<String>, eos: Vec<u32>) -> Self {
        Self {
            tokens: Vec::new(),
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            sent: 0,
            text: String::new(),
            stopped: false,
            eos,
        }
    }

    /// Adds a token; returns the text that became final, if any.
    pub fn push(&mut self, tok: &Tokenizer, token: u32) -> peft::Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        if !self.eos.contains(&token) {
            self.tokens.push(token);
        }
        let text = tok.decode(&self.tokens, true)?;
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            self.text = text[..cut].to_string();
            self.stopped = true;
            return Ok(self.release(self.text.len()));
        }
        self.text = text;
        if self.text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        // Hold back a tail that is the beginning of some stop string.
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len())
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && self.text.ends_with(&s[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        Ok(self.release(self.text.len() - hold))
    }

    /// Everything not yet released (the choice ended).
    pub fn finish(&mut self) -> String {
        self.release(self.text.len())
    }

    fn release(&mut self, upto: usize) -> String {
        let mut upto = upto.min(self.text.len());
        while !self.text.is_char_boundary(upto) {
            upto -= 1;
        }
        if upto <= self.sent {
            return String::new();
        }
        let out = self.text[self.sent..upto].to_string();
        self.sent = upto;
        out
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}
