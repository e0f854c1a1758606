-- Where a node can be reached directly, as it announced (newline-separated).
ALTER TABLE nodes ADD COLUMN addresses TEXT NOT NULL DEFAULT '';
